"""Checkpoint files: atomic, checksummed, damaged ones detected and skipped for the previous good one."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from dinoforge.core.errors import CheckpointError
from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint, load_latest, \
    prune_checkpoints, save_checkpoint
from dinoforge.pretrain.rng_state import capture_rng, restore_rng


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(4, 3, generator=g)}, "name": "x", "lst": [1, 2.5, None]}


def test_roundtrip(tmp_path) -> None:
    path = save_checkpoint(checkpoint_path(tmp_path, 3), _state(3))
    back = load_checkpoint(path)
    assert back["step"] == 3 and back["name"] == "x" and back["lst"] == [1, 2.5, None]
    assert torch.equal(back["model"]["w"], _state(3)["model"]["w"])
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_damaged_checkpoint_falls_back_with_warning(tmp_path, caplog, damage: str) -> None:
    for step in (2, 4):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    newest = checkpoint_path(tmp_path, 4)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "header":
        data[:5] = b"XXXXX"
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        resumed = load_latest(tmp_path)
    assert resumed is not None and resumed.step == 2 and resumed.skipped[0][0] == newest
    assert "skipping damaged checkpoint" in caplog.text
    assert torch.equal(resumed.state["model"]["w"], _state(2)["model"]["w"])


def test_no_usable_checkpoint_is_an_error(tmp_path) -> None:
    assert load_latest(tmp_path) is None
    checkpoint_path(tmp_path, 1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_temporaries_are_ignored_and_prune_keeps_newest(tmp_path) -> None:
    for step in (1, 2, 3, 4):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    (tmp_path / ".step_00000005.ckpt.abc.tmp").write_bytes(b"half written by a killed process")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3, 4]
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_latest(tmp_path).step == 4


def test_refuses_code_in_payload(tmp_path) -> None:
    import hashlib
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf, pickle_module=pickle)
    payload = buf.getvalue()
    header = b"DINOFORGE-CKPT 1 %s %d\n" % (hashlib.sha256(payload).hexdigest().encode(), len(payload))
    path = checkpoint_path(tmp_path, 1)
    path.write_bytes(header + payload)
    with pytest.raises(CheckpointError, match="cannot be unpickled"):
        load_checkpoint(path)


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # leave a cached gaussian around
    save_checkpoint(tmp_path / "rng.ckpt", {"rng": capture_rng()})
    expect = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.ckpt")["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expect
