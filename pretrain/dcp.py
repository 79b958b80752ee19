"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

Layout (``checkpoint.format: dcp``)::

    RUN_DIR/checkpoints/step_00001234.dcp/
        .metadata, __0_0.distcp, __1_0.distcp ...   DCP: student, teacher and AdamW state, as shards
        train_state.ckpt                            dinoforge file (checksummed, weights_only): config, progress
                                                    (step, data position), spike detector, centres, scaler,
                                                    every rank's RNG state, optimizer param groups, and the
                                                    size of every DCP file

Only tensors go through DCP (its non-tensor values would be unpickled with ``weights_only=False`` on load);
the rest stays in the verified single-file format of :mod:`.checkpointing`.

* **Atomic**: shards are written to ``.step_00001234.dcp.partial``; once every rank is done, rank 0 writes
  ``train_state.ckpt`` (with the file sizes) and renames the directory. A kill leaves a partial directory,
  which is ignored (and removed by the next save); a truncated shard file fails the size check on load.
* **Asynchronous** (``checkpoint.async_save``): the state is copied to CPU memory (DCP's staging), then
  written by a background thread on a process group of its own while training continues; the previous save
  is finished (and renamed) before the next one starts, before a rollback, and at the end of the run.
* **Any world size on load**: DCP reshards on read, so a checkpoint of 2 ranks resumes on 1 or 4.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinoforge.core.errors import CheckpointError
from dinoforge.pretrain.checkpointing import TRAIN_STATE_FILE, dcp_files, save_checkpoint

log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def _alone_is_fine() -> Iterator[None]:
    """Silence DCP's warning that, with no process group, it reads or writes in this process alone: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*single process", category=UserWarning)
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def tensor_state(student: nn.Module, teacher: nn.Module,
                 optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This rank's shards (DTensors under FSDP2, whole tensors otherwise) and the optimizer's param groups.

    Returns:
        ``{"student", "teacher"[, "optimizer"]}`` for DCP, and the param groups (kept out of DCP).
    """
    state: dict[str, Any] = {"student": get_model_state_dict(student), "teacher": get_model_state_dict(teacher)}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        optim = get_optimizer_state_dict(student, optimizer)  # creates empty AdamW state on a fresh optimizer
        state["optimizer"] = optim["state"]
        groups = optim["param_groups"]
    return state, groups


class DcpWriter:
    """Writes DCP checkpoints, synchronously or in the background (one save in flight at a time).

    Args:
        directory: ``RUN_DIR/checkpoints``.
        async_save: write in a background thread after staging the state in CPU memory.
        on_done: called on rank 0 once a checkpoint is complete (pruning of older ones).
    """

    def __init__(self, directory: Path, *, async_save: bool, on_done: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.async_save = async_save
        self.on_done = on_done
        # a background save runs collectives: on the main group they would interleave with training's
        self.group = dist.new_group(backend="gloo") if async_save and _distributed() else None
        self._pending: tuple[Future | None, Path, Path, dict[str, Any]] | None = None
        if _is_main() and directory.is_dir():
            for stale in directory.glob(f".step_*.dcp{PARTIAL_SUFFIX}"):  # a killed save's leftovers
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, final: Path, tensors: dict[str, Any], small: dict[str, Any]) -> None:
        """Write ``tensors`` with DCP under ``final`` and ``small`` as its ``train_state.ckpt`` (a collective)."""
        self.wait()
        partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        with _alone_is_fine():
            future = dcp.async_save(tensors, checkpoint_id=partial, process_group=self.group) \
                if self.async_save else None
            if future is None:
                dcp.save(tensors, checkpoint_id=partial)
        self._pending = (future, partial, final, small)
        if not self.async_save:
            self.wait()

    def wait(self) -> Path | None:
        """Finish the save in flight, if any: all shards written, train state added, directory renamed."""
        if self._pending is None:
            return None
        future, partial, final, small = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _barrier()
        if _is_main():
            save_checkpoint(partial / TRAIN_STATE_FILE, {**small, "dcp_files": dcp_files(partial)})
            shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resume at its end)
            partial.rename(final)
            if self.on_done is not None:
                self.on_done()
        _barrier()
        return final


def load_dcp_into(path: str | Path, *, student: nn.Module, teacher: nn.Module,
                  optimizer: torch.optim.Optimizer | None, param_groups: list[dict[str, Any]]) -> None:
    """Read a DCP checkpoint into built (possibly sharded) modules and optimizer; any world size.

    Raises:
        CheckpointError: the checkpoint does not hold what this model and optimizer need.

    Call it with a directory :func:`~dinoforge.pretrain.checkpointing.load_checkpoint` verified.
    """
    tensors, _ = tensor_state(student, teacher, optimizer)
    try:
        with _alone_is_fine():
            dcp.load(tensors, checkpoint_id=Path(path))  # reshards into this rank's tensors
        set_model_state_dict(student, tensors["student"])
        set_model_state_dict(teacher, tensors["teacher"])
        if optimizer is not None:
            set_optimizer_state_dict(student, optimizer, {"state": tensors["optimizer"], "param_groups": param_groups})
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit this model: {err}") from err


def read_dcp_tensors(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Whole tensors under ``prefix`` (``"teacher"``) of a DCP checkpoint, read in this process only.

    Only the requested entries are read, each assembled from its shard files; nothing else of the checkpoint
    (student, optimizer) is touched and no process group is needed.

    Returns:
        ``{name: tensor}`` without the prefix (``backbone.pos_embed`` ...).
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        with _alone_is_fine():
            loaded = _load_state_dict_from_keys(keys={prefix}, checkpoint_id=Path(path))
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable DCP checkpoint: {err}") from err
    if prefix not in loaded or not loaded[prefix]:
        raise CheckpointError(f"{path} holds no '{prefix}' tensors")
    return dict(loaded[prefix])
