"""Function-matching mixup of feature distillation: exact blends, deterministic per data step."""

from __future__ import annotations

import torch

from dinoforge.distill.meta import mix_views


def test_blends_are_convex_pairs_of_crops_of_the_group() -> None:
    crops = torch.randn(16, 3, 8, 8)
    mixed = mix_views(crops, 1.0, seed=3)
    flat, out = crops.flatten(1), mixed.flatten(1)  # [16, 192]
    for i in range(16):
        # each output is w * x_i + (1 - w) * x_j for one partner j and w in [0, 1]
        fits = []
        for j in range(16):
            diff = flat[i] - flat[j]
            if diff.norm() == 0:
                fits.append((torch.allclose(out[i], flat[i]), 1.0))
                continue
            w = float(((out[i] - flat[j]) @ diff) / (diff @ diff))
            fits.append((torch.allclose(out[i], w * flat[i] + (1 - w) * flat[j], atol=1e-5), w))
        assert any(ok and -1e-6 <= w <= 1 + 1e-6 for ok, w in fits)


def test_probability_and_determinism() -> None:
    crops = torch.randn(400, 3, 2, 2)
    assert torch.equal(mix_views(crops, 0.0, seed=1), crops)
    a, b, c = mix_views(crops, 0.5, seed=7), mix_views(crops, 0.5, seed=7), mix_views(crops, 0.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)  # a resumed step redraws exactly the same blends
    changed = (a != crops).flatten(1).any(1).float().mean()
    assert 0.35 < float(changed) < 0.65
