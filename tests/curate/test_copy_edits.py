"""Copy edits: deterministic per seed, real changes, valid images; unseen families stay out of training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinoforge.curate import edits


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    skimage = pytest.importorskip("skimage")
    return Image.fromarray(skimage.data.astronaut()).resize((160, 160))


@pytest.mark.parametrize("family", list(edits.FAMILIES))
def test_every_family_is_seeded_and_changes_the_image(photo: Image.Image, family: str) -> None:
    a = edits.apply(family, photo, np.random.default_rng(3))
    b = edits.apply(family, photo, np.random.default_rng(3))
    assert a.mode == "RGB" and min(a.size) >= 16
    assert np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same copy
    if a.size == photo.size:
        assert np.abs(np.asarray(a, np.int16) - np.asarray(photo, np.int16)).mean() > 0.5


def test_crop_keeps_at_least_half_the_area(photo: Image.Image) -> None:
    rng = np.random.default_rng(0)
    areas = [np.prod(edits.crop(photo, rng).size) / np.prod(photo.size) for _ in range(200)]
    assert min(areas) >= 0.45 and max(areas) <= 0.96  # 0.5..0.95 up to rounding of the sides


def test_unseen_families_are_not_training_edits() -> None:
    assert not set(edits.UNSEEN) & set(edits.SINGLE)
    assert set(edits.FAMILIES) >= set(edits.SINGLE) | set(edits.UNSEEN) | {"crop+overlay", "combo2", "combo3"}


def test_training_view_is_random_but_reproducible(photo: Image.Image) -> None:
    views = [edits.training_view(photo, np.random.default_rng(s)) for s in range(6)]
    assert len({np.asarray(v).tobytes() for v in views}) == 6
    again = edits.training_view(photo, np.random.default_rng(0))
    assert np.array_equal(np.asarray(again), np.asarray(views[0]))


def test_emoji_source_is_named() -> None:
    assert "icons" in edits.emoji_source() or "shapes" in edits.emoji_source()
