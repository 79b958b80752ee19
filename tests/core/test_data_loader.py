"""Loaders: bad samples dropped, counted, logged and listed (also across worker processes); subsets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.core.data import (UNLABELLED, BadSample, ImageFolderSource, SkippingLoader, holdout_split,
                                 image_batches, iter_good, map_source, open_source, random_subset, shuffled,
                                 slice_source, stratified_subset)
from dinoforge.core.data.loader import SkipStats
from dinoforge.core.errors import DataError, ImageDecodeError
from dinoforge.core.preprocess import PreprocessConfig, preprocess_image
from tests.core.helpers import make_labelled_folder, write_corrupt_jpeg


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


CFG = PreprocessConfig(mode="center_crop", size=28, resize_size=32, patch_size=14)


@pytest.fixture()
def folder_with_bad_files(sample_images_dir: Path, tmp_path: Path) -> Path:
    make_labelled_folder(sample_images_dir, tmp_path, per_class=3)
    write_corrupt_jpeg(tmp_path / "imagenet" / "broken.jpg", sample_images_dir)
    (tmp_path / "mnist" / "empty.png").write_bytes(b"")
    (tmp_path / "cifar10" / "text.png").write_text("I am not a PNG")
    return tmp_path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_counted_listed(folder_with_bad_files: Path, num_workers: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    src = ImageFolderSource(folder_with_bad_files)
    loader = image_batches(src, CFG, batch_size=4, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="dinoforge.data"):
        batches = list(loader)
    ids = [i for b in batches for i in b.ids]
    bad = {"imagenet/broken.jpg", "mnist/empty.png", "cifar10/text.png"}
    assert sorted(ids) == sorted(set(src.ids) - bad)
    assert loader.stats.bad == 3 and loader.stats.good == 9 and loader.stats.seen == 12
    assert {b.id for b in loader.stats.bad_samples} == bad
    assert all(b.path and Path(b.path).is_file() for b in loader.stats.bad_samples)
    logged = caplog.text
    assert all(name in logged for name in bad) and "skipped 3 of 12 samples" in logged
    # Every good batch holds exactly what the single-image path produces.
    for batch in batches:
        assert batch.pixels.shape[1:] == (3, 28, 28) and batch.pixels.dtype == torch.float32
        for pixels, label, sample_id in zip(batch.pixels, batch.labels, batch.ids, strict=True):
            idx = src.ids.index(sample_id)
            assert torch.equal(pixels, preprocess_image(src[idx].image, CFG))
            assert int(label) == src.labels[idx]
    assert loader.stats.to_dict()["bad"] == 3


def test_all_bad_batch_is_skipped(sample_images_dir: Path, tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"a{i}.png").write_bytes(b"junk")
    Image.open(next(sample_images_dir.glob("cifar10_*.png"))).save(tmp_path / "z.png")
    loader = image_batches(ImageFolderSource(tmp_path), CFG, batch_size=3)
    batches = list(loader)
    assert len(batches) == 1 and batches[0].ids == ["z.png"]
    assert batches[0].labels.tolist() == [UNLABELLED]
    assert loader.stats.bad == 3


class _MultiCrop:
    """A training-style transform returning two crops, raising ImageDecodeError on tiny images."""

    def __call__(self, sample):
        if min(sample.image.size) < 30:
            raise ImageDecodeError("too small for the crops")
        return {"global": preprocess_image(sample.image, CFG), "id": sample.id}


def test_general_loader_with_custom_transform_and_collate(folder_with_bad_files: Path) -> None:
    src = ImageFolderSource(folder_with_bad_files)
    loader = SkippingLoader(map_source(src, _MultiCrop()), collate_fn=lambda items: [x["id"] for x in items],
                            batch_size=5, shuffle=True, seed=3)

    first = [i for b in loader for i in b]
    again = [i for b in loader for i in b]
    assert first == again  # same seed and epoch: same order
    loader.set_epoch(1)
    assert [i for b in loader for i in b] != first
    # mnist images are 28 px: rejected by the transform, counted as bad like unreadable files.
    assert all(not i.startswith("mnist/") for i in first) and len(first) == 6
    assert loader.stats.bad == 3 * 6


def test_patch_multiple_sizes_need_batch_size_one(sample_images_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (30, 40)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    cfg = PreprocessConfig(mode="patch_multiple", size=28, patch_size=14)
    with pytest.raises(DataError, match="batch_size=1"):
        list(image_batches(ImageFolderSource(tmp_path), cfg, batch_size=2))
    shapes = [tuple(b.pixels.shape) for b in image_batches(ImageFolderSource(tmp_path), cfg, batch_size=1)]
    assert shapes == [(1, 3, 42, 28), (1, 3, 28, 42)]


def test_iter_good_and_loader_arguments(folder_with_bad_files: Path) -> None:
    stats = SkipStats()
    good = list(iter_good(ImageFolderSource(folder_with_bad_files), stats))
    assert len(good) == 9 and stats.bad == 3 and "skipped 3 of 12" in stats.summary()
    with pytest.raises(DataError, match="batch_size must be positive"):
        image_batches(ImageFolderSource(folder_with_bad_files), CFG, batch_size=0)


def test_subset_helpers_are_deterministic() -> None:
    src = open_source("fmnist:test")
    a, b = random_subset(src, 300, seed=5), random_subset(src, 300, seed=5)
    assert a.ids == b.ids and len(set(a.ids)) == 300
    perm = shuffled(src, seed=1)
    assert sorted(perm.ids[:5]) != perm.ids[:5] and len(perm) == len(src)
    strat = stratified_subset(src, 7, seed=2)
    assert np.bincount(strat.labels).tolist() == [7] * 10
    rest, held = holdout_split(src, 0.1, seed=4)
    assert len(held) == 1000 and len(rest) == 9000 and not set(rest.ids) & set(held.ids)
    assert holdout_split(src, 0.1, seed=4)[1].ids == held.ids
    sl = slice_source(src, -3, None)
    assert sl.ids == ["fmnist:test:9997", "fmnist:test:9998", "fmnist:test:9999"]
    nested = random_subset(slice_source(src, 0, 100), 10, seed=0)
    assert all(int(i.rsplit(":", 1)[1]) < 100 for i in nested.ids)
    assert isinstance(nested[0], BadSample) is False and nested[0].label == nested.labels[0]


def test_concat_source(folder_with_bad_files: Path) -> None:
    from dinoforge.core.data import ConcatSource

    a, b = open_source("fmnist:test[:3]"), open_source("fmnist:train[:2]")
    same = ConcatSource([a, b])
    assert len(same) == 5 and same.classes == a.classes
    assert same.ids[3] == "fmnist:train:0" and same.labels.tolist() == a.labels.tolist() + b.labels.tolist()
    assert same[4].id == "fmnist:train:1" and same.describe() == f"{same.spec} (5 samples, 10 classes)"
    folder = ImageFolderSource(folder_with_bad_files)
    mixed = ConcatSource([folder, a])
    assert mixed.classes is None and len(mixed) == len(folder) + 3
    # Class indices of differently-named parts would collide: the name moves to meta, the label is dropped.
    last = mixed[len(mixed) - 1]
    assert last.label is None and last.meta["class_name"] == a.classes[a.labels[2]]
    bad = [x for x in mixed if isinstance(x, BadSample)]
    assert len(bad) == 3
