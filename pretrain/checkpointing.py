"""Self-verifying training checkpoints: atomic, checksummed, with fallback to the last good one.

Two formats, listed, loaded and pruned alike: a single file ``step_00001234.ckpt`` (everything, gathered on
rank 0) or a sharded directory ``step_00001234.dcp/`` (:mod:`.dcp`: DCP shards plus a ``train_state.ckpt``
in the file format below, which also records the size of every shard file).

File format (``RUN_DIR/checkpoints/step_00001234.ckpt``)::

    DINOFORGE-CKPT 1 <sha256 of payload> <payload bytes>\\n
    <payload: torch.save of a dict of tensors / numbers / strings (loaded with weights_only=True)>

A checkpoint is written to a temporary sibling, fsynced and renamed (:func:`dinoforge.core.fileio.atomic_open`),
so a kill at any moment leaves either the previous set or the new file, never a half file under the final
name. A file that was damaged later (bit rot, truncated copy) fails its checksum; :func:`load_latest` then
warns and falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinoforge.core.errors import CheckpointError
from dinoforge.core.fileio import atomic_open

log = logging.getLogger(__name__)

MAGIC = b"DINOFORGE-CKPT"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.(ckpt|dcp)$")
TRAIN_STATE_FILE = "train_state.ckpt"  # inside a DCP checkpoint directory


def checkpoint_path(directory: Path, step: int, *, sharded: bool = False) -> Path:
    """Where the checkpoint taken after ``step`` completed steps lives (``.dcp`` directory when ``sharded``)."""
    return directory / f"step_{step:08d}.{'dcp' if sharded else 'ckpt'}"


def dcp_files(path: Path) -> dict[str, int]:
    """Size of every file DCP wrote in a sharded checkpoint directory."""
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != TRAIN_STATE_FILE}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Serialise ``state`` and write it atomically with a checksummed header.

    Args:
        path: destination file.
        state: nested dict of tensors, numbers, strings, lists (what ``torch.load(weights_only=True)`` reads).
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = b"%s %d %s %d\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(header)
        handle.write(payload)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint.

    A sharded (``.dcp``) directory gives its ``train_state.ckpt`` with ``dcp_dir`` set to the directory, once
    every shard file recorded there is present with its size; the tensors stay on disk for
    :func:`dinoforge.pretrain.dcp.load_dcp_into`.

    Raises:
        CheckpointError: missing, not a dinoforge checkpoint, truncated, checksum mismatch, or unpicklable.
    """
    path = Path(path)
    if path.is_dir():
        return _load_sharded(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        header = handle.readline(256)
        payload = handle.read()
    parts = header.split()
    if len(parts) != 4 or parts[0] != MAGIC:
        raise CheckpointError(f"{path} is not a dinoforge training checkpoint (bad header)")
    if int(parts[1]) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format {int(parts[1])}; this version reads {VERSION}")
    if len(payload) != int(parts[3]):
        raise CheckpointError(f"{path} is truncated: {len(payload)} of {int(parts[3])} payload bytes")
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"{path} is corrupt: payload checksum does not match its header")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{path} cannot be unpickled: {err}") from err


def _load_sharded(path: Path) -> dict[str, Any]:
    if not (path / TRAIN_STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete sharded checkpoint (no {TRAIN_STATE_FILE})")
    state = load_checkpoint(path / TRAIN_STATE_FILE)
    found = dcp_files(path)
    for name, size in state.get("dcp_files", {}).items():
        if found.get(name) != size:
            raise CheckpointError(f"{path}: shard file {name} is missing or truncated ({found.get(name)} of "
                                  f"{size} bytes)")
    return {**state, "dcp_dir": str(path)}


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint (file or DCP directory) in ``directory``, oldest first (temporaries
    ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


@dataclass
class Resumed:
    """A checkpoint that was loaded, and the newer ones that had to be skipped."""

    step: int
    path: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]]


def load_latest(directory: str | Path) -> Resumed | None:
    """Load the newest checkpoint that verifies; warn about (and skip) damaged newer ones.

    Returns:
        ``None`` when the directory holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them verifies.
    """
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s; falling back to the previous one", err)
            skipped.append((path, str(err)))
            continue
        return Resumed(step=step, path=path, state=state, skipped=skipped)
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise CheckpointError(f"no usable checkpoint in {directory}: {reasons}")
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    found = list_checkpoints(directory)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return doomed
