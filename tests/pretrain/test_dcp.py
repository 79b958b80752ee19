"""Sharded (DCP) training checkpoints: resume at another world size, bit-exact resume, damage, export.

The distributed tests train the tiny recipe under torchrun on gloo, as ``dinoforge pretrain`` runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dinoforge.core.artifact import load_artifact
from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint, load_latest
from dinoforge.pretrain.dcp import read_dcp_tensors
from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import assert_same, run_cli

COMMON = ["train.threads=1", "monitor.log_every=1", "data.num_workers=0", "model.backbone.drop_path_rate=0.2"]
LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def _train(run_dir: Path, nproc: int, *overrides: str) -> None:
    done = run_cli("pretrain", "--config", "tiny", f"run_dir={run_dir}", *COMMON, *overrides, nproc=nproc,
                   timeout=900)  # 4 processes on 2 shared cores start slowly
    assert done.returncode == 0, done.stderr[-4000:]


def _dcp_tensors(path: Path) -> dict[str, dict]:
    return {part: read_dcp_tensors(path, part) for part in ("student", "teacher", "optimizer")}


def _optimizer_state(full: dict) -> dict:
    """The per-parameter AdamW tensors of a gathered optimizer state (``state`` keyed by parameter name)."""
    return full["state"]


def test_single_process_dcp_checkpoint_roundtrip_export_and_damage(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run, 1, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.format=dcp")
    steps = [(s, p.name) for s, p in list_checkpoints(run / "checkpoints")]
    assert steps == [(2, "step_00000002.dcp"), (4, "step_00000004.dcp")]
    state = load_checkpoint(checkpoint_path(run / "checkpoints", 4, sharded=True))
    assert state["progress"]["step"] == 4 and state["world_size"] == 1 and "student" not in state
    # the teacher written by DCP is the teacher the run exported at its end
    out = tmp_path / "exported"
    done = run_cli("pretrain-export", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    exported, from_run = load_artifact(out), load_artifact(run / "artifact")
    assert_same(exported.backbone.state_dict(), from_run.backbone.state_dict(), "backbone")
    assert_same(exported.heads["dino_head"].state_dict(), from_run.heads["dino_head"].state_dict(), "dino_head")
    assert run_cli("pretrain-export", str(run), "--out", str(out)).returncode != 0  # no silent overwrite
    # a truncated shard file: the newest checkpoint is refused, the previous one is used
    shard = next(p for p in (run / "checkpoints" / "step_00000004.dcp").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-10])
    found = load_latest(run / "checkpoints")
    assert found is not None and found.step == 2 and "truncated" in found.skipped[0][1]


def _resume_as_file(src: Path, dst: Path, nproc: int, step: int, *overrides: str) -> dict:
    """Copy a run, resume it with ``nproc`` processes at its last step; return the gathered file checkpoint."""
    shutil.copytree(src, dst)
    _train(dst, nproc, f"train.max_steps={step}", "checkpoint.format=file", *overrides)
    return load_checkpoint(checkpoint_path(dst / "checkpoints", step))


def _assert_resumed(dcp_dir: Path, resumed: dict) -> None:
    saved = _dcp_tensors(dcp_dir)
    assert_same(saved["student"], resumed["student"], "student")
    assert_same(saved["teacher"], resumed["teacher"], "teacher")
    assert_same(saved["optimizer"], _optimizer_state(resumed["optimizer"]), "optimizer")


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_at_other_world_sizes(tmp_path: Path) -> None:
    """Saved by 2 ranks, resumed by 1 and by 4 (and saved by 1, resumed by 2): the same tensors, resharded."""
    two = tmp_path / "two"
    _train(two, 2, "train.max_steps=2", "checkpoint.every_steps=2", "checkpoint.format=dcp",
           "parallel.strategy=fsdp")
    dcp_dir = checkpoint_path(two / "checkpoints", 2, sharded=True)
    _assert_resumed(dcp_dir, _resume_as_file(two, tmp_path / "one", 1, 2))
    _assert_resumed(dcp_dir, _resume_as_file(two, tmp_path / "four", 4, 2, "parallel.strategy=fsdp"))
    one = tmp_path / "single"
    _train(one, 1, "train.max_steps=2", "checkpoint.every_steps=2", "checkpoint.format=dcp")
    _assert_resumed(checkpoint_path(one / "checkpoints", 2, sharded=True),
                    _resume_as_file(one, tmp_path / "one_to_two", 2, 2, "parallel.strategy=fsdp"))


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in LOSS_KEYS if k in r} for r in read_metrics(run_dir) if "total_loss" in r}


@pytest.mark.slow
@pytest.mark.distributed
def test_same_world_size_resume_is_bit_exact(tmp_path: Path) -> None:
    """2 ranks, FSDP2, stochastic depth: stop after 5 steps and resume == 10 steps straight (async saves too)."""
    args = ("checkpoint.every_steps=5", "checkpoint.format=dcp", "parallel.strategy=fsdp")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 2, "train.max_steps=10", "checkpoint.async_save=true", *args)
    _train(resumed, 2, "train.max_steps=5", *args)
    _train(resumed, 2, "train.max_steps=10", *args)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(6, 11):  # the five steps after the resume: equal to the last bit
        assert a[step] == b[step], step
    final = checkpoint_path(straight / "checkpoints", 10, sharded=True)
    assert_same(_dcp_tensors(final), _dcp_tensors(checkpoint_path(resumed / "checkpoints", 10, sharded=True)),
                "final")
    small_a, small_b = load_checkpoint(final), load_checkpoint(checkpoint_path(resumed / "checkpoints", 10,
                                                                               sharded=True))
    for part in ("centres", "spikes", "rng", "progress"):
        if part == "progress":  # wall time differs
            small_a[part].pop("train_seconds"), small_b[part].pop("train_seconds")
        assert_same(small_a[part], small_b[part], part)


def test_async_save_snapshots_the_state_at_the_call(tmp_path: Path) -> None:
    """What an asynchronous save writes is the state when it was called, not what training did meanwhile."""
    from dinoforge.pretrain.dcp import DcpWriter

    writer = DcpWriter(tmp_path, async_save=True)
    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    expected = weights["w"].clone()
    writer.save(tmp_path / "step_00000001.dcp", {"student": weights}, {"format": "dinoforge-pretrain"})
    weights["w"].mul_(-1)  # the next optimizer step, while the write may still be running
    writer.wait()
    assert torch.equal(read_dcp_tensors(tmp_path / "step_00000001.dcp", "student")["w"], expected)
    assert load_checkpoint(tmp_path / "step_00000001.dcp")["dcp_dir"].endswith("step_00000001.dcp")
