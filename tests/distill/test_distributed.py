"""2 gloo processes under torchrun distil like 1 process with the same global batch (DDP and FSDP2).

The data, parallelisation and collectives are the pretraining ones (see ``tests/pretrain/test_distributed.py``
for why they agree). What is specific here:

* head mode: the frozen teacher's Sinkhorn-Knopp targets sum their statistics over ranks (iBOT with the
  all-reduced token count), so they equal one process holding every row; KoLeo is per rank by design
  (official semantics) and is switched off for this comparison;
* feature mode has no cross-sample statistic at all: every loss term is a per-token mean over equal-sized
  rank slices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoforge.pretrain.checkpointing import checkpoint_path, load_checkpoint
from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import run_cli

STEPS = 4
COMMON = ["train.threads=1", f"train.max_steps={STEPS}", f"checkpoint.every_steps={STEPS}", "monitor.log_every=1",
          "knn.at_end=false"]
HEAD = ["head.centering=sinkhorn_knopp", "head.koleo_loss_weight=0.0"]
FEATURE = ["mode=feature", "teacher.num_heads=2", "crops.global_crops_size=56", "crops.local_crops_size=28",
           ("students=[{name: f, backbone: {embed_dim: 32, depth: 2, num_heads: 2, patch_size: 7, img_size: 56, "
            "layerscale_init: 0.1}}]"), "schedule.lr_scaling=none", "schedule.base_lr=0.002"]


def _distill(run_dir: Path, teacher: Path, nproc: int, *overrides: str) -> None:
    done = run_cli("distill", "--config", "tiny", f"run_dir={run_dir}", f"teacher.path={teacher}", *COMMON,
                   *overrides, nproc=nproc)
    assert done.returncode == 0, done.stderr[-4000:]


def _losses(run_dir: Path) -> list[dict[str, float]]:
    """Per-student loss terms of every logged step."""
    return [{k: v for k, v in r.items() if "/" in k and "feature_std" not in k}
            for r in read_metrics(run_dir) if "total_loss" in r]


def _assert_match(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == STEPS
    for sa, sb in zip(la, lb, strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-6), (key, sa, sb)
    pa = load_checkpoint(checkpoint_path(a / "checkpoints", STEPS))
    pb = load_checkpoint(checkpoint_path(b / "checkpoints", STEPS))
    for tree in ("student", "teacher"):  # the students and their EMA
        assert pa[tree].keys() == pb[tree].keys()
        for name, ta in pa[tree].items():
            torch.testing.assert_close(pb[tree][name], ta, rtol=1e-3, atol=2e-5, msg=f"{tree}.{name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_head_mode_ddp_matches_one_process(tmp_path: Path, pretrained_teacher: Path) -> None:
    _distill(tmp_path / "one", pretrained_teacher, 1, "data.batch_size=8", *HEAD)
    _distill(tmp_path / "ddp", pretrained_teacher, 2, "data.batch_size=4", "parallel.strategy=ddp", *HEAD)
    _assert_match(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
@pytest.mark.distributed
def test_feature_mode_fsdp_matches_one_process(tmp_path: Path, official_pth: Path) -> None:
    _distill(tmp_path / "one", official_pth, 1, "data.batch_size=8", *FEATURE)
    _distill(tmp_path / "fsdp", official_pth, 2, "data.batch_size=4", "parallel.strategy=fsdp", *FEATURE)
    _assert_match(tmp_path / "one", tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "artifacts" / "f" / "model.json").is_file()  # gathered from the shards
