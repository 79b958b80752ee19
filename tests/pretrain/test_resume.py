"""Never lose a run: SIGKILL a real training process mid-run, resume it, and get bit-identical parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint
from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import assert_same, checkpoint_exists, cli_command, kill_when, process_env

STEPS = 10
ARGS = ["train.threads=1", f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep=5",
        "monitor.log_every=1", "data.num_workers=0", "model.backbone.drop_path_rate=0.2"]
ENV = process_env(PYTHONHASHSEED="0")


def _cmd(run_dir: Path) -> list[str]:
    return cli_command("pretrain", "--config", "tiny", f"run_dir={run_dir}", *ARGS)


def _run(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir), env=ENV, capture_output=True, text=True, timeout=300, check=False)


def _kill_after_checkpoint(run_dir: Path, step: int) -> None:
    """Start a run and SIGKILL it as soon as the checkpoint of ``step`` exists (the run is mid-training)."""
    kill_when(_cmd(run_dir), checkpoint_exists(run_dir, step), env=ENV)


def _final(run_dir: Path) -> dict:
    return load_checkpoint(checkpoint_path(run_dir / "checkpoints", STEPS))


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run(straight)
    assert done.returncode == 0, done.stderr[-3000:]

    _kill_after_checkpoint(killed, 4)  # killed somewhere in steps 5-6
    assert max(s for s, _ in list_checkpoints(killed / "checkpoints")) < STEPS
    _kill_after_checkpoint(killed, 6)  # resumed, then killed again
    # damage the newest checkpoint: the resume must warn and fall back to the previous good one
    newest = list_checkpoints(killed / "checkpoints")[-1][1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = _run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr

    a, b = _final(straight), _final(killed)
    for part in ("student", "teacher", "centres", "optimizer", "spikes", "rng"):
        assert_same(a[part], b[part], part)
    assert a["progress"]["step"] == b["progress"]["step"] == STEPS
    # the metrics of the resumed run are the uninterrupted run's, step for step (duplicates truncated)
    keys = ("total_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "lr", "teacher_temp")
    ma = [{k: r[k] for k in keys} for r in read_metrics(straight) if "total_loss" in r]
    mb = [{k: r[k] for k in keys} for r in read_metrics(killed) if "total_loss" in r]
    assert [r for r in read_metrics(killed) if "total_loss" in r][-1]["step"] == STEPS
    assert ma == mb


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_run_continues(tmp_path: Path) -> None:
    """SIGTERM to the process group (preemption): the step in flight finishes, checkpoint + artifact, exit 0."""
    run = tmp_path / "run"
    cmd = [*_cmd(run), "data.num_workers=1"]  # the signal reaches the data worker too, as in a real preemption
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoint_path(run / "checkpoints", 2).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, like a scheduler's preemption
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped early" in out and "stop requested (SIGTERM)" in err
    stopped_at = max(s for s, _ in list_checkpoints(run / "checkpoints"))
    assert 2 <= stopped_at < STEPS and (run / "artifact" / "model.json").is_file()
    assert _run(run).returncode == 0
    assert max(s for s, _ in list_checkpoints(run / "checkpoints")) == STEPS
