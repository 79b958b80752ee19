"""Linear probe: the side-by-side SGD grid against torch.optim.SGD one classifier at a time; selection,
folding of the standardisation, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinoforge.core.errors import DataError
from dinoforge.core.eval import LinearProbeConfig, linear_probe, train_linear_grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def _data(n: int, dim: int, classes: int, seed: int, spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    # Features with very different scales per dimension: standardisation must handle them.
    scale = torch.logspace(-2, 2, dim)
    return (centres[y] + spread * torch.randn(n, dim, generator=g)) * scale + 5.0, y


def reference_sgd(x: torch.Tensor, y: torch.Tensor, lr: float, wd: float, classes: int,
                  cfg: LinearProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One classifier with torch.optim.SGD + LambdaLR cosine, same data order (same generator use)."""
    layer = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD([{"params": [layer.weight], "weight_decay": wd},
                           {"params": [layer.bias], "weight_decay": 0.0}], lr=lr, momentum=cfg.momentum)
    steps = math.ceil(len(x) / cfg.batch_size) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return layer.weight.detach().T, layer.bias.detach()


def test_grid_matches_torch_sgd_per_classifier() -> None:
    x, y = _data(300, 6, 4, seed=0)
    x = (x - x.mean(0)) / x.std(0)
    cfg = LinearProbeConfig(epochs=3, batch_size=64, seed=7)
    pairs = [(0.05, 0.0), (0.5, 1e-2)]
    weight, bias = train_linear_grid(x, y, torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]),
                                     4, cfg)

    for g, (lr, wd) in enumerate(pairs):
        ref_w, ref_b = reference_sgd(x, y, lr, wd, 4, cfg)
        torch.testing.assert_close(weight[g], ref_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias[g], ref_b, rtol=1e-4, atol=1e-5)


def test_probe_selects_reports_and_folds() -> None:
    train_x, train_y = _data(1200, 10, 5, seed=1)
    test_x, test_y = _data(400, 10, 5, seed=2)
    cfg = LinearProbeConfig(lrs=(1e-4, 1e-1), wds=(0.0, 1e-3), epochs=8, batch_size=128, seed=3)
    res = linear_probe(train_x, train_y, test_x, test_y, config=cfg)
    assert len(res.sweep) == 4 and res.n_val == 120 and res.n_train == 1200 and res.n_test == 400
    assert res.val_top1 == max(s["val_top1"] for s in res.sweep)
    assert (res.best_lr, res.best_wd) in [(s["lr"], s["wd"]) for s in res.sweep if s["val_top1"] == res.val_top1]
    assert res.best_lr == 1e-1  # 1e-4 barely moves the zero-initialised weights in 8 epochs
    assert res.top1 > 90.0 and res.top5 >= res.top1
    # The returned layer works on raw (unstandardised) features and reproduces the reported accuracy.
    with torch.no_grad():
        pred = res.classifier(test_x).argmax(1)
    assert 100 * (pred == test_y).float().mean().item() == pytest.approx(res.top1)
    assert "classifier" not in res.to_dict()
    again = linear_probe(train_x, train_y, test_x, test_y, config=cfg)
    assert again.to_dict() | {"seconds": 0} == res.to_dict() | {"seconds": 0}
    assert torch.equal(again.classifier.weight, res.classifier.weight)


def test_probe_errors() -> None:
    x, y = _data(50, 4, 3, seed=4)
    bad = y.clone()
    bad[:5] = -1
    with pytest.raises(DataError, match="5 training samples have none"):
        linear_probe(x, bad, x, y)
    with pytest.raises(DataError, match="do not match"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(DataError, match="too few"):
        linear_probe(x[:1], y[:1], x, y)
