"""Teachers for the distillation tests: a real pretraining run's artifact and official-format checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: Overrides that keep in-process runs short and single-threaded.
FAST = ["train.threads=1", "data.num_workers=0", "monitor.progress=false", "knn.at_end=false"]


@pytest.fixture(scope="session")
def pretrained_teacher(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    """The artifact (backbone + DINO head, K = 64) of a short ``dinoforge pretrain --config tiny`` run."""
    from dinoforge.pretrain.config import load_pretrain_config
    from dinoforge.pretrain.pretrain_run import pretrain_trainer

    run_dir = tmp_path_factory.mktemp("teacher") / "tiny"
    cfg = load_pretrain_config("tiny", [f"run_dir={run_dir}", "train.threads=1", "train.max_steps=8",
                                        "checkpoint.every_steps=8", "knn.at_end=false"])
    result = pretrain_trainer(cfg).run()
    assert result.artifact is not None
    return result.artifact


def official_state_dict(fixtures_dir: Path, variant: str = "noreg") -> dict[str, torch.Tensor]:
    """The official-name backbone state dict stored in ``backbone_official_<variant>.pt``."""
    data = torch.load(fixtures_dir / f"backbone_official_{variant}.pt", weights_only=True)
    return {k[len("state_dict/"):]: v for k, v in data.items() if k.startswith("state_dict/")}


@pytest.fixture(scope="session")
def official_pth(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """An official DINOv2 ``.pth`` (official key layout, D=64, patch 14, no registers) from the golden fixture."""
    path = tmp_path_factory.mktemp("official") / "dinov2_test_noreg.pth"
    torch.save(official_state_dict(fixtures_dir), path)
    return path
