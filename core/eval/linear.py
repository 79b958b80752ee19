"""Linear probe on frozen features: an (lr, wd) sweep on a held-out part of train, then test accuracy.

All sweep classifiers are trained side by side as one ``[G, D, C]`` weight tensor with per-classifier
learning rate and weight decay (the DINOv2 linear evaluation trains its grid in parallel the same way).
Softmax regression is convex, so weights start at zero: the result depends only on the data order (seeded).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import nn

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import DataError

_SPLIT_SEED_OFFSET = 1_000_003


class LinearProbeConfig(StrictModel):
    """Sweep and optimisation settings of :func:`linear_probe`."""

    lrs: tuple[float, ...] = Field((1e-3, 1e-2, 1e-1), min_length=1, description="Peak SGD learning rates.")
    wds: tuple[float, ...] = Field((0.0, 1e-4), min_length=1, description="Weight decays (not on the bias).")
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(256, gt=0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Part of train held out to pick (lr, wd).")
    seed: int = 0
    standardize: bool = Field(True, description="Scale features by the training mean/std (folded back after).")


@dataclass
class LinearProbeResult:
    """Test accuracy (percent) of the selected classifier, and the sweep that selected it."""

    top1: float
    top5: float
    best_lr: float
    best_wd: float
    val_top1: float
    sweep: list[dict[str, float]]
    num_classes: int
    n_train: int
    n_val: int
    n_test: int
    seconds: float
    classifier: nn.Linear = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-ready (without the classifier weights)."""
        return {k: v for k, v in self.__dict__.items() if k != "classifier"}


def _standardizer(x: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not enabled:
        return torch.zeros(x.shape[1], device=x.device), torch.ones(x.shape[1], device=x.device)
    return x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)


def train_linear_grid(x: torch.Tensor, y: torch.Tensor, lrs: torch.Tensor, wds: torch.Tensor, num_classes: int,
                      cfg: LinearProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``G`` softmax classifiers at once with SGD + momentum and a cosine schedule.

    Args:
        x: ``[N, D]`` (already standardised) features; y: ``[N]`` labels.
        lrs, wds: ``[G]`` learning rate and weight decay of each classifier.

    Returns:
        weights ``[G, D, C]`` and biases ``[G, C]``.
    """
    n, dim = x.shape
    groups = len(lrs)
    # Stored as one [D, G*C] matrix so that each step is two plain GEMMs over all classifiers at once.
    weight = torch.zeros(dim, groups, num_classes, device=x.device)  # [D, G, C]
    bias = torch.zeros(groups, num_classes, device=x.device)  # [G, C]
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lr_w, wd_w = lrs.view(1, groups, 1).to(x.device), wds.view(1, groups, 1).to(x.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(n / cfg.batch_size) * cfg.epochs
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]  # [B, D], [B]
            logits = (xb @ weight.view(dim, -1)).view(len(yb), groups, num_classes) + bias  # [B, G, C]
            # Gradient of the mean cross-entropy w.r.t. the logits: (softmax - one_hot) / B.
            dlogits = logits.softmax(dim=-1)
            dlogits[torch.arange(len(yb)), :, yb] -= 1.0
            dlogits /= len(yb)
            grad_w = (xb.T @ dlogits.view(len(yb), -1)).view(dim, groups, num_classes) + wd_w * weight
            scale = 0.5 * (1.0 + math.cos(math.pi * step / steps))
            buf_w.mul_(cfg.momentum).add_(grad_w)
            buf_b.mul_(cfg.momentum).add_(dlogits.sum(dim=0))
            weight -= lr_w * scale * buf_w
            bias -= lr_w[0] * scale * buf_b
            step += 1
    return weight.permute(1, 0, 2).contiguous(), bias


def _accuracy(logits: torch.Tensor, y: torch.Tensor, top: int) -> float:
    """Percent of rows whose label is among the ``top`` largest logits; logits ``[..., N, C]``."""
    best = logits.topk(min(top, logits.shape[-1]), dim=-1).indices  # [..., N, top]
    hits = int((best == y[:, None]).any(dim=-1).sum())
    return 100.0 * hits / len(y)


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"linear probe: {n} training samples are too few to hold out {fraction:.0%}")
    # The split gets its own stream so that it does not correlate with the shuffling order of the same seed.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _SPLIT_SEED_OFFSET))
    return perm[n_val:], perm[:n_val]


def _check(x: torch.Tensor, y: torch.Tensor, what: str) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.int64).reshape(-1)
    if x.dim() != 2 or len(x) != len(y):
        raise DataError(f"linear probe: {what} features {list(x.shape)} do not match {len(y)} labels")
    if (y < 0).any():
        raise DataError(f"linear probe needs labels: {int((y < 0).sum())} {what} samples have none")
    return y


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 config: LinearProbeConfig | None = None, num_classes: int | None = None,
                 device: str | torch.device = "cpu") -> LinearProbeResult:
    """Select (lr, wd) on a held-out split of train, retrain on all of train, report on test.

    Args:
        train_x: ``[N, D]``; train_y: ``[N]``; test_x: ``[M, D]``; test_y: ``[M]``.
        config: sweep settings.
        num_classes: ``C`` (default: largest label + 1).
        device: where to train.

    Returns:
        Test top-1/top-5 (percent), the sweep, and ``classifier`` (``nn.Linear(D, C)`` on raw features).
    """
    cfg = config or LinearProbeConfig()
    train_y, test_y = _check(train_x, train_y, "training"), _check(test_x, test_y, "test")
    start = time.perf_counter()
    classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    x, y = train_x.to(device, torch.float32), train_y.to(device)
    pairs = [(lr, wd) for lr in cfg.lrs for wd in cfg.wds]
    lrs, wds = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    fit_idx, val_idx = (i.to(device) for i in _split(len(x), cfg.val_fraction, cfg.seed))
    mean, std = _standardizer(x[fit_idx], cfg.standardize)
    weight, bias = train_linear_grid((x[fit_idx] - mean) / std, y[fit_idx], lrs, wds, classes, cfg)
    val_logits = torch.einsum("nd,gdc->gnc", (x[val_idx] - mean) / std, weight) + bias[:, None, :]  # [G, V, C]
    val_acc = [_accuracy(val_logits[g], y[val_idx], 1) for g in range(len(pairs))]
    best = max(range(len(pairs)), key=lambda g: (val_acc[g], -g))  # first pair wins ties
    mean, std = _standardizer(x, cfg.standardize)
    weight, bias = train_linear_grid((x - mean) / std, y, lrs[best:best + 1], wds[best:best + 1], classes, cfg)
    linear = nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # fold the standardisation into the layer: W' = W / std, b' = b - (mean / std) W
        linear.weight.copy_((weight[0] / std[:, None]).T.cpu())
        linear.bias.copy_((bias[0] - (mean / std) @ weight[0]).cpu())
        test_logits = linear.to(device)(test_x.to(device, torch.float32))  # [M, C]
    sweep = [{"lr": lr, "wd": wd, "val_top1": acc} for (lr, wd), acc in zip(pairs, val_acc, strict=True)]
    return LinearProbeResult(
        top1=_accuracy(test_logits, test_y.to(device), 1), top5=_accuracy(test_logits, test_y.to(device), 5),
        best_lr=pairs[best][0], best_wd=pairs[best][1], val_top1=val_acc[best], sweep=sweep, num_classes=classes,
        n_train=len(x), n_val=len(val_idx), n_test=len(test_y), seconds=time.perf_counter() - start,
        classifier=linear.cpu().eval())
