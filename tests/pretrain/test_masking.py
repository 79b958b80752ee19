"""Block masks and the collate's mask part: exact official draws, invariants and the batch layout.

The README's statistical tests (2000 of our own draws: count-histogram TV, per-stratum means, position
frequency, fraction of masked crops, generator TV per request) run in ``test_parity.py`` through the
``masking`` parity handler.
"""

from __future__ import annotations

import random

import pytest
import torch

from dinoforge.pretrain.masking import (
    MaskingGenerator,
    collate_data_and_cast,
    collate_masks,
    collate_upperbound,
    mask_statistics,
    official_max_num_patches,
)


@pytest.fixture(scope="module")
def masking_fixture(fixtures_dir):
    return torch.load(fixtures_dir / "masking.pt", weights_only=True)


@pytest.mark.parametrize("grid", [4, 8])
def test_first_twenty_official_collate_draws_are_reproduced_exactly(masking_fixture, grid: int) -> None:
    fx = masking_fixture
    generator = MaskingGenerator(grid, max_num_patches=float(fx[f"grid{grid}/max_num_patches"]))
    # The generator script seeded each grid's collate stream with python_random_seed + 1000 + grid.
    rng = random.Random(int(fx["python_random_seed"]) + 1000 + grid)
    ref = fx[f"grid{grid}/collate_first_draws_masks"]
    for i in range(len(ref)):
        out = collate_masks(int(fx["n_global_crops"]), generator, rng=rng)
        assert torch.equal(out["masks"], ref[i]), f"draw {i} differs"
        assert out["upperbound"] == int(fx[f"grid{grid}/collate_upperbound"])


def test_global_random_module_gives_the_same_stream_as_a_seeded_instance() -> None:
    generator = MaskingGenerator(6, max_num_patches=18.0)
    random.seed(123)
    from_module = [collate_masks(8, generator)["masks"] for _ in range(5)]  # official: the global stream
    rng = random.Random(123)
    from_instance = [collate_masks(8, generator, rng=rng)["masks"] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(from_module, from_instance, strict=True))


def test_official_rectangle_cap_quirk() -> None:
    assert official_max_num_patches(224, 14) == 128.0  # 16x16 grid: half
    assert official_max_num_patches(70, 14) == 10.0  # 5x5 grid: floor(5/2)*5, not 12.5
    assert official_max_num_patches(518, 14) == 666.0  # 37x37: not 684.5


@pytest.mark.parametrize("grid", [(5, 5), (4, 7)])
def test_generator_never_exceeds_the_request_and_zero_draws_nothing(grid: tuple[int, int]) -> None:
    generator = MaskingGenerator(grid, max_num_patches=official_max_num_patches(14 * grid[0], 14))
    rng = random.Random(0)
    n = grid[0] * grid[1]
    for target in range(n + 1):
        for _ in range(20):
            mask = generator(target, rng=rng)
            assert mask.shape == grid and mask.sum() <= target
    state = rng.getstate()
    assert generator(0, rng=rng).sum() == 0 and rng.getstate() == state  # no random number consumed


def test_collate_masks_invariants() -> None:
    generator = MaskingGenerator(6, max_num_patches=18.0)
    rng = random.Random(1)
    for _ in range(50):
        out = collate_masks(12, generator, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5, rng=rng)
        masks = out["masks"]
        assert masks.shape == (12, 36) and masks.dtype == torch.bool
        assert int((masks.sum(1) > 0).sum()) <= 6  # int(2B * 0.5) strata at most
        assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
        assert out["n_masked_patches"] == len(out["mask_indices"])
        crop = out["mask_indices"] // 36
        for c in crop.unique():  # the weights of every masked crop sum to one
            assert out["masks_weight"][crop == c].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert out["upperbound"] == collate_upperbound(12, 36)
    # Strata upper ratios 0.1 + 0.4 (i + 1) / 6 of N = 36: int() of each, float32 products as officially.
    assert collate_upperbound(12, 36) == sum(int(36 * p) for p in torch.linspace(0.1, 0.5, 7)[1:])


def test_mask_statistics_of_an_empty_batch_row() -> None:
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[2, [0, 4]] = True
    stats = mask_statistics(masks)
    assert stats["mask_indices"].tolist() == [18, 22] and stats["masks_weight"].tolist() == [0.5, 0.5]


def test_collate_data_and_cast_is_crop_major() -> None:
    samples = [{"global_crops": [torch.full((3, 28, 28), 10.0 * b + c) for c in range(2)],
                "local_crops": [torch.full((3, 14, 14), 100.0 + 10 * b + j) for j in range(3)]} for b in range(4)]
    batch = collate_data_and_cast(samples, generator=MaskingGenerator(2, max_num_patches=2.0),
                                  dtype=torch.float64, rng=random.Random(0))
    assert batch["global_crops"].shape == (8, 3, 28, 28) and batch["global_crops"].dtype == torch.float64
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]  # row c * B + b
    assert batch["local_crops"][:, 0, 0, 0].tolist()[:5] == [100, 110, 120, 130, 101]  # row j * B + b
    assert batch["masks"].shape == (8, 4)
    no_local = collate_data_and_cast([{"global_crops": s["global_crops"], "local_crops": []} for s in samples],
                                     generator=MaskingGenerator(2, max_num_patches=2.0), rng=random.Random(0))
    assert no_local["local_crops"].shape == (0, 3, 28, 28)


def test_bad_masking_input_is_a_clear_error() -> None:
    from dinoforge.core.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="invalid grid"):
        MaskingGenerator(0, max_num_patches=1.0)
    with pytest.raises(ConfigError, match="mask_ratio_min_max"):
        collate_masks(4, MaskingGenerator(4, max_num_patches=8.0), mask_ratio_min_max=(0.5, 0.1))
    with pytest.raises(DataError, match="empty"):
        collate_data_and_cast([], generator=MaskingGenerator(4, max_num_patches=8.0))
    one_global = [{"global_crops": [torch.zeros(3, 28, 28)], "local_crops": []}]
    with pytest.raises(DataError, match="2 global crops"):
        collate_data_and_cast(one_global, generator=MaskingGenerator(4, max_num_patches=8.0))
