"""Multi-crop augmentation: layout, determinism, official blur semantics, and every op against torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from dinoforge.core.errors import ConfigError
from dinoforge.core.config import build_config
from dinoforge.pretrain.augment import SLOTS, CropsConfig, MultiCropAugmentation, _gaussian_blur, _jitter_op, \
    crop_box

_FLIP, _JIT_APPLY, _GRAY, _BLUR, _SOLAR = 22, 23, 32, 33, 35


def _cfg(**kw: object) -> CropsConfig:
    base = {"global_crops_size": 28, "local_crops_size": 12, "local_crops_number": 3, "blur_kernel_size": 5,
            "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return CropsConfig(**{**base, **kw})


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 28 + i % 3, 30), generator=g, dtype=torch.uint8) for i in range(n)]


def test_layout_and_determinism() -> None:
    cfg = _cfg()
    aug = MultiCropAugmentation(cfg)
    imgs = _images(5)
    u = np.random.default_rng(0).random((5, cfg.n_crops, SLOTS))
    g1, l1 = aug(imgs, u)
    g2, l2 = aug(imgs, u)
    assert g1.shape == (2, 5, 3, 28, 28) and l1.shape == (3, 5, 3, 12, 12)
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    # each image's crops depend only on its own row of uniforms: augmenting a subset gives the same rows
    g_sub, l_sub = aug(imgs[2:4], u[2:4])
    torch.testing.assert_close(g_sub, g1[:, 2:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(l_sub, l1[:, 2:4], rtol=0, atol=1e-6)
    g3, _ = aug(imgs, np.random.default_rng(1).random((5, cfg.n_crops, SLOTS)))
    assert not torch.equal(g1, g3)


def test_grey_images_become_rgb_and_are_normalised() -> None:
    cfg = _cfg(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = torch.full((1, 28, 28), 128, dtype=torch.uint8)
    u = np.full((1, cfg.n_crops, SLOTS), 0.99)  # no flip/jitter/gray/blur/solarize
    g, _ = MultiCropAugmentation(cfg)([img], u)
    torch.testing.assert_close(g, torch.full_like(g, (128 / 255 - 0.5) / 0.25), rtol=0, atol=1e-5)


def test_crop_box_matches_torchvision_distribution() -> None:
    """Our box sampler and torchvision's RandomResizedCrop.get_params draw from the same distribution."""
    scale, ratio, h, w = (0.05, 0.32), (3 / 4, 4 / 3), 40, 60
    rng = np.random.default_rng(0)
    ours = np.array([crop_box(rng.random(22), h, w, scale, ratio) for _ in range(4000)])
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(4000)])
    for col in range(4):  # top, left, height, width: compare means and spreads
        assert abs(ours[:, col].mean() - ref[:, col].mean()) < 0.06 * ref[:, col].std() + 0.3
        assert abs(ours[:, col].std() - ref[:, col].std()) < 0.08 * ref[:, col].std() + 0.3
    area = ours[:, 2] * ours[:, 3] / (h * w)
    assert area.min() > scale[0] * 0.8 and area.max() < scale[1] * 1.25
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()


def test_crop_box_fallback_is_central() -> None:
    # an impossible scale for a thin image forces the 10 attempts to fail -> central crop clamped to ratio
    top, left, h, w = crop_box(np.full(22, 0.999), 10, 200, (1.0, 1.0), (3 / 4, 4 / 3))
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (200 - w) // 2


@pytest.mark.parametrize(("op", "fn", "factor"), [(0, TF.adjust_brightness, 1.3), (1, TF.adjust_contrast, 0.7),
                                                  (2, TF.adjust_saturation, 1.4), (3, TF.adjust_hue, -0.08)])
def test_jitter_ops_match_torchvision(op: int, fn, factor: float) -> None:
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(op))
    ours = _jitter_op(x.clone(), op, torch.full((4,), factor))
    ref = torch.stack([fn(xi, factor) for xi in x])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_blur_matches_torchvision_per_image_sigma() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = [0.3, 1.0, 2.0]
    ours = _gaussian_blur(x.clone(), torch.tensor(sigmas), 9)
    ref = torch.stack([TF.gaussian_blur(xi, [9, 9], [s, s]) for xi, s in zip(x, sigmas, strict=True)])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def _plain_crops(cfg: CropsConfig, img: torch.Tensor, blur_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    u = np.full((1, cfg.n_crops, SLOTS), 0.99)
    u[..., :22] = 0.5  # a valid crop box
    u[..., _BLUR] = blur_u
    u[..., 34] = 0.5  # sigma
    return MultiCropAugmentation(cfg)([img], u)


@pytest.mark.parametrize(("intended", "expect"), [(False, (False, True, True)), (True, (True, False, True))])
def test_blur_probabilities_official_vs_intended(intended: bool, expect: tuple[bool, bool, bool]) -> None:
    """Official effective probabilities are 0 / 0.9 / 0.5; intended 1 / 0.1 / 0.5 (u = 0.3 separates them)."""
    img = _images(1)[0]
    cfg = _cfg(blur_as_intended=intended)
    sharp = _plain_crops(_cfg(), img, 0.999)  # official probabilities are all < 0.999: nothing blurred
    blurred = _plain_crops(cfg, img, 0.3)
    got = (not torch.equal(sharp[0][0], blurred[0][0]), not torch.equal(sharp[0][1], blurred[0][1]),
           not torch.equal(sharp[1][0], blurred[1][0]))
    assert got == expect
    assert cfg.blur_probabilities() == ((1.0, 0.1, 0.5) if intended else (0.0, 0.9, 0.5))


def test_solarize_only_on_second_global_crop() -> None:
    cfg = _cfg()
    img = _images(1)[0]
    u = np.full((1, cfg.n_crops, SLOTS), 0.99)
    u[..., :22] = 0.5
    base_g, base_l = MultiCropAugmentation(cfg)([img], u)
    u[..., _SOLAR] = 0.0
    sol_g, sol_l = MultiCropAugmentation(cfg)([img], u)
    assert torch.equal(base_g[0], sol_g[0]) and torch.equal(base_l, sol_l)
    thr = 128 / 255
    expect = torch.where(base_g[1] >= thr, 1 - base_g[1], base_g[1])
    torch.testing.assert_close(sol_g[1], expect, rtol=0, atol=1e-6)


def test_flip_and_grayscale() -> None:
    cfg = _cfg()
    img = _images(1)[0]
    u = np.full((1, cfg.n_crops, SLOTS), 0.99)
    u[..., :22] = 0.5
    base, _ = MultiCropAugmentation(cfg)([img], u)
    u[..., _FLIP] = 0.0
    flipped, _ = MultiCropAugmentation(cfg)([img], u)
    torch.testing.assert_close(flipped, base.flip(-1), rtol=0, atol=0)
    u[..., _FLIP] = 0.99
    u[..., _GRAY] = 0.0
    gray, _ = MultiCropAugmentation(cfg)([img], u)
    ref = TF.rgb_to_grayscale(base[0, 0], num_output_channels=3)
    # torchvision's tensor path weighs red 0.2989, PIL (the official pipeline) and we 0.299
    torch.testing.assert_close(gray[0, 0], ref, rtol=0, atol=2e-4)


def test_jitter_probability_is_about_point_eight() -> None:
    cfg = _cfg(local_crops_number=0)
    img = _images(1)[0]
    rng = np.random.default_rng(3)
    u = rng.random((400, cfg.n_crops, SLOTS))
    u[..., _GRAY] = 0.99
    u[..., _BLUR] = 0.999
    u[..., _SOLAR] = 0.99
    jittered = MultiCropAugmentation(cfg)([img] * 400, u)[0]
    u[..., _JIT_APPLY] = 0.99
    plain = MultiCropAugmentation(cfg)([img] * 400, u)[0]
    changed = (jittered[0] != plain[0]).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.8) < 0.06


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="blur_kernel_size"):
        build_config(CropsConfig, {"blur_kernel_size": 4})
    with pytest.raises(ConfigError, match="unknown key 'blurr'"):
        build_config(CropsConfig, {"blurr": 1})
    with pytest.raises(ConfigError, match="local_crops_scale"):
        build_config(CropsConfig, {"local_crops_scale": [0.5, 0.1]})
    assert math.isclose(CropsConfig().ratio[1], 4 / 3)


def test_grey_fast_path_equals_rgb_path() -> None:
    """Grey inputs skip saturation/hue (identities on grey pixels): same crops as the RGB-replicated image."""
    cfg = _cfg()
    grey = torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    u = np.random.default_rng(7).random((16, cfg.n_crops, SLOTS))
    fast = MultiCropAugmentation(cfg)([grey] * 16, u)
    slow = MultiCropAugmentation(cfg)([grey.expand(3, -1, -1).contiguous()] * 16, u)
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=1e-5)
