"""The patch-PCA picture: foreground found by the first component, joint colours across images."""

from __future__ import annotations

import numpy as np
import pytest

from dinoforge.serve.patch_pca import patch_pca


def _object_parts(rng: np.random.Generator, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two part vectors sharing a strong "object" direction (as DINOv2 foreground tokens do), and a background."""
    common = 3 * rng.standard_normal(d)
    return common + rng.standard_normal((2, d)), np.zeros(d)


def _scene(rng: np.random.Generator, h: int, w: int, box: tuple[slice, slice], parts: np.ndarray,
           background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``[h*w, D]``: noise around ``background`` outside ``box``; inside, the left half of the box is
    part 0 and the right half part 1 (two directions), so a good PCA separates both."""
    d = background.shape[0]
    tokens = background + 0.05 * rng.standard_normal((h, w, d))
    mask = np.zeros((h, w), dtype=bool)
    mask[box] = True
    rows, cols = np.nonzero(mask)
    mid = (cols.min() + cols.max() + 1) / 2
    for r, c in zip(rows, cols, strict=True):
        tokens[r, c] = parts[int(c >= mid)] + 0.05 * rng.standard_normal(d)
    return tokens.reshape(h * w, d), mask


def test_first_component_finds_the_object_and_parts_get_distinct_colours() -> None:
    rng = np.random.default_rng(0)
    parts, background = _object_parts(rng)
    tokens, mask = _scene(rng, 10, 12, (slice(3, 8), slice(2, 10)), parts, background)
    (picture,) = patch_pca([tokens], [(10, 12)])
    assert picture.grid == (10, 12) and picture.rgb.shape == (10, 12, 3) and picture.rgb.dtype == np.uint8
    np.testing.assert_array_equal(picture.mask, mask)
    assert not picture.rgb[~mask].any()  # background is black
    left, right = picture.rgb[3:8, 2:6].reshape(-1, 3).mean(0), picture.rgb[3:8, 6:10].reshape(-1, 3).mean(0)
    assert np.abs(left - right).max() > 100  # the two parts are told apart by colour


def test_joint_pca_gives_the_same_part_the_same_colour_in_every_image() -> None:
    rng = np.random.default_rng(1)
    parts, background = _object_parts(rng)
    a, mask_a = _scene(rng, 8, 8, (slice(1, 5), slice(1, 7)), parts, background)
    b, mask_b = _scene(rng, 6, 10, (slice(2, 6), slice(3, 9)), parts, background)
    pa, pb = patch_pca([a, b], [(8, 8), (6, 10)])
    np.testing.assert_array_equal(pa.mask, mask_a)
    np.testing.assert_array_equal(pb.mask, mask_b)
    # left part of the object: same colour (within noise) in both images
    assert np.abs(pa.rgb[1:5, 1:4].reshape(-1, 3).mean(0) - pb.rgb[2:6, 3:6].reshape(-1, 3).mean(0)).max() < 30


def test_no_clear_foreground_colours_every_patch_and_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(2)
    tokens = rng.standard_normal((4, 16))  # a 2x2 grid: too small to split
    (picture,) = patch_pca([tokens], [(2, 2)])
    assert picture.mask.all()
    with pytest.raises(ValueError, match="do not match a 3x3 grid"):
        patch_pca([tokens], [(3, 3)])
    with pytest.raises(ValueError, match="one grid per token array"):
        patch_pca([], [])
