"""Never lose a distillation run: SIGKILL a real process mid-run, resume it, get bit-identical students and EMA.

The resume machinery is the pretraining one (checkpoints, RNG states, data position, centres); this test
checks that a distillation run (two students, centring mode, so the teacher-normalisation centres matter)
goes through it intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint
from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import assert_same

STEPS = 8
STUDENTS = ("students=[{name: a, seed: 1, backbone: {embed_dim: 16, depth: 2, num_heads: 2, patch_size: 7, "
            "img_size: 28, layerscale_init: 0.1}}, {name: b, seed: 2, backbone: {embed_dim: 24, depth: 1, "
            "num_heads: 2, patch_size: 7, img_size: 28, layerscale_init: 0.1}}]")


def _cmd(run_dir: Path, teacher: Path) -> list[str]:
    return [sys.executable, "-m", "dinoforge.core.cli", "distill", "--config", "tiny", f"run_dir={run_dir}",
            f"teacher.path={teacher}", STUDENTS, "head.centering=centering", "train.threads=1",
            f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep=5", "monitor.log_every=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it as soon as the checkpoint of ``step`` exists (mid-training)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not checkpoint_path(run_dir / "checkpoints", step).exists():
            assert proc.poll() is None, "distillation exited before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path: Path, pretrained_teacher: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_cmd(straight, pretrained_teacher), env=_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    _kill_after_checkpoint(_cmd(killed, pretrained_teacher), killed, 4)
    assert max(s for s, _ in list_checkpoints(killed / "checkpoints")) < STEPS
    resumed = subprocess.run(_cmd(killed, pretrained_teacher), env=_env(), capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a = load_checkpoint(checkpoint_path(straight / "checkpoints", STEPS))
    b = load_checkpoint(checkpoint_path(killed / "checkpoints", STEPS))
    for part in ("student", "teacher", "centres", "optimizer", "spikes", "rng"):
        assert_same(a[part], b[part], part)
    wall = "train_seconds"  # wall time differs, everything else about progress must not
    assert_same({k: v for k, v in a["progress"].items() if k != wall},
                {k: v for k, v in b["progress"].items() if k != wall}, "progress")
    assert a["centres"]["dino_centering.center"].abs().sum() > 0  # centring mode: the centres were used
    keys = ("total_loss", "a/dino_local_crops_loss", "b/ibot_loss", "a/koleo_loss", "lr", "momentum")
    ma = [{k: r[k] for k in keys} for r in read_metrics(straight) if "total_loss" in r]
    mb = [{k: r[k] for k in keys} for r in read_metrics(killed) if "total_loss" in r]
    assert len(ma) == STEPS and ma == mb
