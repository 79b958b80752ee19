"""Teacher-grid resampling against brute force: paint both grids onto a common pixel grid and average."""

from __future__ import annotations

import math

import pytest
import torch

from dinoforge.distill.grid import overlap_weights, resample_tokens, token_grid


def _brute_force_area(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Upsample the source grid to a pixel grid fine enough for both (lcm), then average each target cell."""
    batch, _, dim = tokens.shape
    ph, pw = math.lcm(src[0], dst[0]), math.lcm(src[1], dst[1])
    grid = tokens.double().reshape(batch, src[0], src[1], dim)
    pixels = grid.repeat_interleave(ph // src[0], 1).repeat_interleave(pw // src[1], 2)  # [B, ph, pw, D]
    cells = pixels.reshape(batch, dst[0], ph // dst[0], dst[1], pw // dst[1], dim)
    return cells.mean(dim=(2, 4)).reshape(batch, dst[0] * dst[1], dim)


@pytest.mark.parametrize(("src", "dst"), [((16, 16), (14, 14)), ((4, 4), (8, 8)), ((4, 6), (7, 3)),
                                          ((5, 5), (5, 5)), ((3, 7), (6, 2))])
def test_area_matches_pixel_brute_force(src: tuple[int, int], dst: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, src[0] * src[1], 5, generator=g, dtype=torch.float64)
    out = resample_tokens(tokens, src, dst, "area")
    assert out.shape == (2, dst[0] * dst[1], 5)
    torch.testing.assert_close(out, _brute_force_area(tokens, src, dst), rtol=1e-12, atol=1e-12)


def test_overlap_weights_properties() -> None:
    w = overlap_weights(14, 16, dtype=torch.float64)  # patch-16 student under a patch-14 teacher at 224 px
    assert w.shape == (14, 16)
    torch.testing.assert_close(w.sum(1), torch.ones(14, dtype=torch.float64))
    assert (w > 0).sum(1).max() == 2  # a 16-px cell straddles at most two 14-px cells
    assert torch.equal(overlap_weights(4, 4), torch.eye(4))
    block = overlap_weights(2, 4)  # integer down-sampling: plain block means
    assert torch.equal(block, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="positive"):
        overlap_weights(0, 3)


def test_equal_grids_are_returned_untouched_and_bilinear_is_smooth() -> None:
    tokens = torch.randn(3, 16, 4)
    assert resample_tokens(tokens, (4, 4), (4, 4)) is tokens
    const = torch.full((1, 16, 4), 2.5)
    for mode in ("area", "bilinear"):
        for dst in ((7, 7), (2, 3)):
            expect = torch.full((1, dst[0] * dst[1], 4), 2.5)
            torch.testing.assert_close(resample_tokens(const, (4, 4), dst, mode), expect)
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1)  # value = column index
    up = resample_tokens(ramp, (4, 4), (4, 8), "bilinear").reshape(4, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1]) and up.unique().numel() > 4  # monotone, not piecewise constant


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="do not form a 3x3 grid"):
        resample_tokens(torch.zeros(1, 10, 2), (3, 3), (2, 2))
    with pytest.raises(ValueError, match="unknown grid resampling"):
        resample_tokens(torch.zeros(1, 9, 2), (3, 3), (2, 2), "nearest")  # type: ignore[arg-type]
    assert token_grid((224, 224), 14) == (16, 16) and token_grid((42, 70), 14) == (3, 5)
