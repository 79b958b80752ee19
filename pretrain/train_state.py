"""Everything a checkpoint holds, gathered from (and scattered back to) a possibly distributed run.

Contents: student and teacher (backbone and heads, full unsharded tensors), teacher-normalisation centres,
AdamW state, the fp16 grad-scaler, the step and data-stream position, the loss-spike detector, the RNG states
of every rank, and the resolved config. Model and optimizer states go through
``torch.distributed.checkpoint.state_dict``: gathered whole on rank 0 for the single-file format (one file
serves plain, DDP and FSDP2 runs alike, at the same world size), or kept as each rank's shards for the DCP
format (:mod:`.dcp`), which resumes at any world size. :class:`CheckpointWriter` writes the configured one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinoforge.core.errors import CheckpointError
from dinoforge.pretrain.checkpointing import checkpoint_path, prune_checkpoints, save_checkpoint
from dinoforge.pretrain.dcp import DcpWriter, load_dcp_into, tensor_state
from dinoforge.pretrain.rng_state import capture_rng, restore_rng

log = logging.getLogger(__name__)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Progress:
    """Counters that advance with training (all saved)."""

    step: int = 0  # optimizer steps completed
    data_offset: int = 0  # data steps skipped by rollbacks: data step = step + data_offset
    images_seen: int = 0
    rollbacks: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_step(self) -> int:
        """Index of the batch the next step reads."""
        return self.step + self.data_offset

    def state_dict(self) -> dict[str, Any]:
        """Plain values."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


def _gather_rng() -> list[dict[str, Any]]:
    state = capture_rng()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, state)
    return everyone


def collect_small_state(*, centres: nn.Module, scaler: torch.amp.GradScaler | None, progress: Progress,
                        spikes: dict[str, Any], config_yaml: str) -> dict[str, Any]:
    """Everything but the model and optimizer tensors (a collective: the RNG states of every rank are gathered)."""
    return {
        "format": "dinoforge-pretrain",
        "centres": {k: v.detach().cpu().clone() for k, v in centres.state_dict().items()},
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": progress.state_dict(),
        "spikes": spikes,
        "rng": _gather_rng(),
        "config_yaml": config_yaml,
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
    }


def collect_state(*, student: nn.Module, teacher: nn.Module, centres: nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, progress: Progress, spikes: dict[str, Any],
                  config_yaml: str) -> dict[str, Any]:
    """The single-file checkpoint dict (complete on rank 0; a collective: every rank must call it).

    Args:
        student, teacher: the *unwrapped* ``ModuleDict`` s (FSDP-sharded modules are fine).
        centres: module holding the teacher-normalisation buffers.
    """
    return {
        **collect_small_state(centres=centres, scaler=scaler, progress=progress, spikes=spikes,
                              config_yaml=config_yaml),
        "student": get_model_state_dict(student, options=_FULL),
        "teacher": get_model_state_dict(teacher, options=_FULL),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=_FULL),
    }


def restore_state(state: dict[str, Any], *, student: nn.Module, teacher: nn.Module, centres: nn.Module,
                  optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None,
                  progress: Progress | None, rank: int = 0, world_size: int = 1) -> None:
    """Load a checkpoint dict into a built run (every rank calls it with the same dict).

    A sharded checkpoint's dict (``dcp_dir`` set by :func:`~dinoforge.pretrain.checkpointing.load_checkpoint`)
    has its model and optimizer tensors read from the shard files, resharded to this run's world size.

    Raises:
        CheckpointError: the checkpoint does not fit the model (names or shapes).
    """
    if state.get("format") != "dinoforge-pretrain":
        raise CheckpointError("not a dinoforge pretraining checkpoint (missing format tag)")
    try:
        if "dcp_dir" in state:
            load_dcp_into(state["dcp_dir"], student=student, teacher=teacher, optimizer=optimizer,
                          param_groups=state["param_groups"])
        else:
            set_model_state_dict(student, state["student"], options=_FULL)
            set_model_state_dict(teacher, state["teacher"], options=_FULL)
            if optimizer is not None:
                set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_FULL)
        centres.load_state_dict(state["centres"])
        if optimizer is not None:
            for group in optimizer.param_groups:  # the state-dict round trip turns tuples into lists
                group["betas"] = tuple(group["betas"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint does not fit this model: {err}") from err
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if progress is not None:
        progress.load_state_dict(state["progress"])
    rngs = state["rng"]
    if len(rngs) == world_size:
        restore_rng(rngs[rank])
    else:
        log.warning("checkpoint was written by %d processes, this run has %d: random states are not restored "
                    "(crops and masks are unaffected; stochastic depth draws differ)", len(rngs), world_size)


class CheckpointWriter:
    """Writes a run's checkpoints in the configured format and keeps the newest ``keep`` (every rank calls it).

    Args:
        directory: ``RUN_DIR/checkpoints``.
        fmt: ``file`` (gathered whole on rank 0) or ``dcp`` (sharded, any world size on resume).
        async_save: ``dcp`` only: write in the background after staging the state in CPU memory.
        keep: checkpoints kept.
    """

    def __init__(self, directory: Path, *, fmt: Literal["file", "dcp"] = "file", async_save: bool = False,
                 keep: int = 3) -> None:
        self.directory = directory
        self.keep = keep
        self.is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        self.dcp = DcpWriter(directory, async_save=async_save, on_done=self._prune) if fmt == "dcp" else None

    def save(self, step: int, *, student: nn.Module, teacher: nn.Module, centres: nn.Module,
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, progress: Progress,
             spikes: dict[str, Any], config_yaml: str) -> None:
        """Checkpoint the run after ``step`` completed steps."""
        if self.dcp is None:
            state = collect_state(student=student, teacher=teacher, centres=centres, optimizer=optimizer,
                                  scaler=scaler, progress=progress, spikes=spikes, config_yaml=config_yaml)
            if self.is_main:
                save_checkpoint(checkpoint_path(self.directory, step), state)
                self._prune()
            return
        tensors, groups = tensor_state(student, teacher, optimizer)
        small = collect_small_state(centres=centres, scaler=scaler, progress=progress, spikes=spikes,
                                    config_yaml=config_yaml)
        self.dcp.save(checkpoint_path(self.directory, step, sharded=True), tensors, {**small, "param_groups": groups})

    def wait(self) -> None:
        """Finish a background save (before reading checkpoints back, and at the end of a run)."""
        if self.dcp is not None:
            self.dcp.wait()

    def _prune(self) -> None:
        if self.is_main:
            prune_checkpoints(self.directory, self.keep)
