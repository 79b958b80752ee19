"""Everything a checkpoint holds, gathered from (and scattered back to) a possibly distributed run.

Contents: student and teacher (backbone and heads, full unsharded tensors), teacher-normalisation centres,
AdamW state, the fp16 grad-scaler, the step and data-stream position, the loss-spike detector, the RNG states
of every rank, and the resolved config. Model and optimizer states go through
``torch.distributed.checkpoint.state_dict`` with full state dicts, so one file serves plain, DDP and FSDP2
runs alike (and a run may be resumed with another strategy at the same world size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

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


def collect_state(*, student: nn.Module, teacher: nn.Module, centres: nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, progress: Progress, spikes: dict[str, Any],
                  config_yaml: str) -> dict[str, Any]:
    """The checkpoint dict (complete on rank 0; a collective: every rank must call it).

    Args:
        student, teacher: the *unwrapped* ``ModuleDict`` s (FSDP-sharded modules are fine).
        centres: module holding the teacher-normalisation buffers.
    """
    state = {
        "format": "dinoforge-pretrain",
        "student": get_model_state_dict(student, options=_FULL),
        "teacher": get_model_state_dict(teacher, options=_FULL),
        "centres": {k: v.detach().cpu().clone() for k, v in centres.state_dict().items()},
        "optimizer": get_optimizer_state_dict(student, optimizer, options=_FULL),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": progress.state_dict(),
        "spikes": spikes,
        "rng": _gather_rng(),
        "config_yaml": config_yaml,
    }
    return state


def restore_state(state: dict[str, Any], *, student: nn.Module, teacher: nn.Module, centres: nn.Module,
                  optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None,
                  progress: Progress | None, rank: int = 0, world_size: int = 1) -> None:
    """Load a checkpoint dict into a built run (every rank calls it with the full dict).

    Raises:
        CheckpointError: the checkpoint does not fit the model (names or shapes).
    """
    if state.get("format") != "dinoforge-pretrain":
        raise CheckpointError("not a dinoforge pretraining checkpoint (missing format tag)")
    try:
        set_model_state_dict(student, state["student"], options=_FULL)
        set_model_state_dict(teacher, state["teacher"], options=_FULL)
        centres.load_state_dict(state["centres"])
        if optimizer is not None:
            set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_FULL)
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
