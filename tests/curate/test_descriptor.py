"""The copy-descriptor trainer: loss terms against direct formulas, augmentation, a short real run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinoforge.core.artifact import load_artifact
from dinoforge.core.cli import main as cli_main
from dinoforge.curate.descriptor import CopyAugment, DescriptorConfig, info_nce, koleo, load_pixels


def test_info_nce_matches_the_formula() -> None:
    z = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    t = 0.1
    expected = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        logits = torch.tensor([(z[i] @ z[j]).item() / t for j in range(6) if j != i])
        target = [j for j in range(6) if j != i].index(pos)
        expected += -(logits[target] - torch.logsumexp(logits, 0)).item()
    assert info_nce(z, t).item() == pytest.approx(expected / 6, rel=1e-5)
    nearest = torch.stack([min(torch.dist(z[i], z[j]) for j in range(6) if j != i) for i in range(6)])
    assert koleo(z).item() == pytest.approx(-torch.log(nearest + 1e-8).mean().item(), rel=1e-4)


def test_augment_keeps_shape_and_changes_pixels() -> None:
    x = load_pixels("fmnist:test[:8]", 28)
    assert x.shape == (8, 3, 28, 28) and x.dtype == torch.uint8
    cfg = DescriptorConfig(data="x", out="y")
    y = CopyAugment(cfg, torch.Generator().manual_seed(0))(x)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, y)


def test_short_training_run_writes_an_artifact(tmp_path: Path) -> None:
    out = tmp_path / "desc"
    args = ["copy-descriptor", "--data", "fmnist:test[:64]", "--out", str(out), "batch_size=16", "max_steps=3",
            "arch.embed_dim=32", "arch.depth=1", "arch.num_heads=2"]
    assert cli_main(args) == 0
    art = load_artifact(out)
    assert art.card.provenance.source == "copy-descriptor" and art.card.preprocessing.size == 28
    assert math.isfinite(art.card.provenance.metrics["final_loss"]) and art.card.provenance.metrics["steps"] == 3
