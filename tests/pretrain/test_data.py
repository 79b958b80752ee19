"""Pretraining data: seeded stream sampler, rank/accumulation-invariant batches, resumability, real sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoforge.core.errors import DataError
from dinoforge.pretrain.augment import CropsConfig
from dinoforge.pretrain.data import BatchLayout, PretrainBatches, StreamSampler, batch_loader
from dinoforge.pretrain.masking import MaskingGenerator, official_max_num_patches
from dinoforge.pretrain.sources import open_pretrain_source

CROPS = CropsConfig(global_crops_size=28, local_crops_size=14, local_crops_number=2, blur_kernel_size=3,
                    blur_sigma=(0.1, 0.5))


def _batches(source, layout: BatchLayout, seed: int = 0) -> PretrainBatches:
    gen = MaskingGenerator(4, max_num_patches=official_max_num_patches(28, 7))
    return PretrainBatches(source, CROPS, layout, mask_generator=gen, mask_ratio=(0.1, 0.5),
                           mask_probability=0.5, seed=seed)


@pytest.fixture(scope="module")
def fmnist_small(fmnist_dir):
    return open_pretrain_source("fmnist:test[:64]")


def test_stream_sampler_permutes_each_epoch() -> None:
    s = StreamSampler(10, seed=3)
    first, second = s.indices(0, 10), s.indices(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    straddle = s.indices(7, 6)  # crosses the epoch boundary
    assert np.array_equal(straddle, np.concatenate([first[7:], second[:3]]))
    assert np.array_equal(StreamSampler(10, seed=3).indices(13, 4), second[3:7])  # a fresh sampler agrees
    assert not np.array_equal(StreamSampler(10, seed=4).indices(0, 10), first)


def test_rank_and_accumulation_invariance(fmnist_small) -> None:
    """1 rank x 2 micro-batches reads exactly what 2 ranks x 1 micro-batch read: images, crops, masks."""
    single = _batches(fmnist_small, BatchLayout(micro_batch=4, accum=2))[5]
    ranks = [_batches(fmnist_small, BatchLayout(micro_batch=4, world_size=2, rank=r))[5][0] for r in (0, 1)]
    assert len(single) == 2
    for micro, rank in zip(single, ranks, strict=True):
        assert torch.equal(micro["indices"], rank["indices"])
        assert torch.equal(micro["masks"], rank["masks"])
        assert torch.equal(micro["mask_indices"], rank["mask_indices"])
        torch.testing.assert_close(micro["global_crops"], rank["global_crops"], rtol=0, atol=1e-6)
        torch.testing.assert_close(micro["local_crops"], rank["local_crops"], rtol=0, atol=1e-6)
    whole = _batches(fmnist_small, BatchLayout(micro_batch=8))[5][0]  # the global batch in one piece
    both = torch.cat([r["indices"] for r in ranks])
    assert torch.equal(whole["indices"], both)
    # crop-major: global crop c of image b is row c*B + b, in the big batch and in the slices alike
    torch.testing.assert_close(whole["global_crops"][8 + 4:8 + 8], ranks[1]["global_crops"][4:8], rtol=0, atol=1e-6)
    assert torch.equal(whole["masks"].view(2, 8, -1)[:, 4:], ranks[1]["masks"].view(2, 4, -1))


def test_batches_are_a_function_of_the_step(fmnist_small) -> None:
    a = _batches(fmnist_small, BatchLayout(micro_batch=4))
    b = _batches(fmnist_small, BatchLayout(micro_batch=4))
    x, y = a[7][0], b[7][0]
    assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["masks"], y["masks"])
    assert not torch.equal(a[8][0]["global_crops"], x["global_crops"])
    assert not torch.equal(_batches(fmnist_small, BatchLayout(micro_batch=4), seed=1)[7][0]["global_crops"],
                           x["global_crops"])


def test_batch_format(fmnist_small) -> None:
    batch = _batches(fmnist_small, BatchLayout(micro_batch=6))[0][0]
    assert batch["global_crops"].shape == (12, 3, 28, 28) and batch["local_crops"].shape == (12, 3, 14, 14)
    masks = batch["masks"]
    assert masks.shape == (12, 16) and masks.dtype == torch.bool
    assert batch["n_masked_patches"] == int(masks.sum()) == len(batch["mask_indices"])
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    per_crop = masks.sum(1)
    weights = batch["masks_weight"]
    crop_of = batch["mask_indices"] // 16
    torch.testing.assert_close(weights, 1.0 / per_crop[crop_of].float())
    assert (per_crop > 0).sum() <= 6  # at most int(2B * 0.5) crops carry masks


def test_workers_give_the_same_batches(fmnist_small) -> None:
    ds = _batches(fmnist_small, BatchLayout(micro_batch=4))
    inline = list(batch_loader(ds, start=3, stop=6, num_workers=0))
    workers = list(batch_loader(ds, start=3, stop=6, num_workers=2))
    assert len(workers) == 3
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a[0]["global_crops"], b[0]["global_crops"])
        assert torch.equal(a[0]["masks"], b[0]["masks"])
        assert a[0]["data_step"] == b[0]["data_step"]


def test_image_folder_source(tuxpaint_dir) -> None:
    source = open_pretrain_source(f"folder:{tuxpaint_dir}/clothes")
    assert len(source) > 5
    img = source.image(0)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    batch = _batches(source, BatchLayout(micro_batch=2))[0][0]
    assert batch["global_crops"].shape == (4, 3, 28, 28)
    assert torch.isfinite(batch["global_crops"]).all()


def test_missing_or_unusable_data_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_pretrain_source(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no images"):
        open_pretrain_source(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="unknown data source scheme"):
        open_pretrain_source("s3:bucket")


def test_unreadable_files_are_replaced_deterministically(tmp_path, tuxpaint_dir) -> None:
    import shutil

    pngs = sorted((tuxpaint_dir / "clothes").rglob("*.png"))[:3]
    for i, src in enumerate(pngs):
        shutil.copy(src, tmp_path / f"img{i}.png")
    (tmp_path / "img1.png").write_bytes(b"not a png at all")  # sorted order: img0, img1 (bad), img2
    source = open_pretrain_source(f"folder:{tmp_path}")
    assert len(source) == 3
    assert torch.equal(source.image(1), source.image(2)) and source.bad_count == 1
    assert source.image(0).shape[0] == 3
