"""Never lose a distillation run: SIGKILL a real process mid-run, resume it, get bit-identical students and EMA.

The resume machinery is the pretraining one (checkpoints, RNG states, data position, centres); this test
checks that a distillation run (two students, centring mode, so the teacher-normalisation centres matter)
goes through it intact.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint
from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import assert_same, checkpoint_exists, cli_command, kill_when, process_env

STEPS = 8
STUDENTS = ("students=[{name: a, seed: 1, backbone: {embed_dim: 16, depth: 2, num_heads: 2, patch_size: 7, "
            "img_size: 28, layerscale_init: 0.1}}, {name: b, seed: 2, backbone: {embed_dim: 24, depth: 1, "
            "num_heads: 2, patch_size: 7, img_size: 28, layerscale_init: 0.1}}]")


ENV = process_env(PYTHONHASHSEED="0")


def _cmd(run_dir: Path, teacher: Path) -> list[str]:
    return cli_command("distill", "--config", "tiny", f"run_dir={run_dir}", f"teacher.path={teacher}", STUDENTS,
                       "head.centering=centering", "train.threads=1", f"train.max_steps={STEPS}",
                       "checkpoint.every_steps=2", "checkpoint.keep=5", "monitor.log_every=1")


def _run(run_dir: Path, teacher: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, teacher), env=ENV, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path: Path, pretrained_teacher: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run(straight, pretrained_teacher)
    assert done.returncode == 0, done.stderr[-3000:]

    kill_when(_cmd(killed, pretrained_teacher), checkpoint_exists(killed, 4), env=ENV)  # mid-training
    assert max(s for s, _ in list_checkpoints(killed / "checkpoints")) < STEPS
    resumed = _run(killed, pretrained_teacher)
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
