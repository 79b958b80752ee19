"""2 gloo processes under torchrun train like 1 process with the same global batch (FSDP2 and DDP).

What makes them equal (and what would not):

* crops, masks and sample order are functions of the global batch and the step, sliced per rank
  (``pretrain.data``), so rank r sees exactly rows ``[r*B, (r+1)*B)`` of the 1-process batch;
* DINO and iBOT losses are per-rank means over equal-sized slices; averaging gradients over ranks (DDP
  all-reduce, FSDP reduce-scatter) gives the gradient of the global mean;
* Sinkhorn-Knopp sums its statistics over ranks: identical to one process holding every row;
* **not** equal by design (official semantics): KoLeo looks for nearest neighbours within a rank's rows, and
  the iBOT *centre* averages per-rank means. So the global-batch comparison uses Sinkhorn-Knopp and KoLeo off;
  KoLeo is then checked against 1 process with 2 accumulation micro-batches, which applies KoLeo per
  micro-batch exactly as 2 ranks apply it per rank.
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
          "model.centering=sinkhorn_knopp", "model.backbone.drop_path_rate=0.0"]
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")


def _train(run_dir: Path, nproc: int, *overrides: str) -> None:
    done = run_cli("pretrain", "--config", "tiny", f"run_dir={run_dir}", *COMMON, *overrides, nproc=nproc)
    assert done.returncode == 0, done.stderr[-4000:]


def _params(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = load_checkpoint(checkpoint_path(run_dir / "checkpoints", STEPS))
    return {"student": state["student"], "teacher": state["teacher"]}


def _losses(run_dir: Path) -> list[dict[str, float]]:
    return [{k: r[k] for k in LOSS_KEYS if k in r} for r in read_metrics(run_dir) if "total_loss" in r]


def _assert_match(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == STEPS
    for sa, sb in zip(la, lb, strict=True):
        for key in sa:
            assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-6), (key, sa, sb)
    pa, pb = _params(a), _params(b)
    for tree in ("student", "teacher"):
        assert pa[tree].keys() == pb[tree].keys()
        for name, ta in pa[tree].items():
            tb = pb[tree][name]
            assert ta.shape == tb.shape, name
            torch.testing.assert_close(tb, ta, rtol=1e-3, atol=2e-5, msg=f"{tree}.{name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    no_koleo = "model.koleo_loss_weight=0.0"
    _train(tmp_path / "one", 1, "data.batch_size=8", no_koleo)
    _train(tmp_path / "fsdp", 2, "data.batch_size=4", "parallel.strategy=fsdp", no_koleo)
    _train(tmp_path / "ddp", 2, "data.batch_size=4", "parallel.strategy=ddp", no_koleo)
    _assert_match(tmp_path / "one", tmp_path / "fsdp")
    _assert_match(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
@pytest.mark.distributed
def test_koleo_per_rank_equals_per_micro_batch(tmp_path: Path) -> None:
    _train(tmp_path / "accum", 1, "data.batch_size=4", "data.grad_accum=2")
    _train(tmp_path / "ddp", 2, "data.batch_size=4", "parallel.strategy=ddp")
    _assert_match(tmp_path / "accum", tmp_path / "ddp")
    assert all(r["koleo_loss"] > 0 for r in read_metrics(tmp_path / "ddp") if "koleo_loss" in r)
