"""One optimisation step of the DINOv2 recipe and the numbers logged about it.

Step order (official): zero grads -> teacher, teacher normalisation, student, losses and backward for
every micro-batch (:meth:`SSLMetaArch.forward_backward`) -> loss-spike check on the rank-averaged loss ->
:func:`apply_update`: set lr / wd / last-layer lr from the schedules -> (fp16: unscale) -> per-sub-module
gradient clipping -> AdamW step -> teacher EMA with this step's momentum. (The official code sets the
learning rates before the forward pass; they are read only by the optimizer step, so the order is the same
computation.)

This is the step ``dinoforge pretrain`` and ``dinoforge distill`` run, and the one ``dinoforge parity``
checks against the official fixtures (:mod:`dinoforge.pretrain.parity.train_step_case`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from dinoforge.pretrain.meta_arch import SSLMetaArch
from dinoforge.pretrain.monitor import collapse_indicators
from dinoforge.pretrain.optim import apply_schedule, ema_update
from dinoforge.pretrain.spikes import SpikeDetector

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast context factory and (fp16 only) a gradient scaler."""

    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    device_type: str


def make_precision(precision: str, device: torch.device) -> Precision:
    """``fp32``: nothing; ``bf16``: autocast; ``fp16``: autocast + dynamic loss scaling."""
    if precision == "fp32":
        return Precision(contextlib.nullcontext, None, device.type)
    dtype = _DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Precision(lambda: torch.autocast(device_type=device.type, dtype=dtype), scaler, device.type)


@dataclass
class StepResult:
    """What one step did."""

    losses: dict[str, float]
    grad_norms: dict[str, float] = field(default_factory=dict)
    spike: bool = False
    applied: bool = True


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (identity without a process group); keys are sorted for a fixed order."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


class StepModel(Protocol):
    """What :func:`train_step` drives: an ``SSLMetaArch`` or a distillation meta-architecture."""

    def forward_backward(self, micro_batches: Sequence[dict], *, teacher_temp: float,
                         backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """Forward and backward of every micro-batch of one step; returns the (averaged) loss values."""
        ...

    def clip_gradients(self, max_norm: float | None) -> dict[str, float]:
        """Clip each trainable sub-module's gradients; returns the norms before clipping."""
        ...

    def train(self, mode: bool = True) -> object:
        """Training mode for the student(s) (``nn.Module.train``; a teacher stays in eval mode)."""
        ...


def train_step(model: StepModel, micro_batches: Sequence[dict], *, values: Mapping[str, float],
               optimizer: torch.optim.Optimizer, precision: Precision, clip_grad: float,
               detector: SpikeDetector, student: nn.ModuleDict, teacher: nn.ModuleDict, device: torch.device,
               on_gradients: Callable[[], None] | None = None) -> StepResult:
    """Run one optimizer step (see the module docstring).

    Args:
        model: the meta-architecture (possibly parallelized).
        micro_batches: this rank's micro-batches of the step, on ``device``.
        values: schedule values of this iteration (``lr``, ``wd``, ``momentum``, ``teacher_temp``,
            ``last_layer_lr``).
        student, teacher: the unwrapped module dicts (EMA on local shards under FSDP).
        on_gradients: called once the gradients of the step are complete, before unscaling and clipping
            (parity reads the raw gradients there; training passes nothing).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler

    def backward(loss: torch.Tensor) -> None:
        # Leave autocast for backward (gradients then follow the forward dtypes, as recommended).
        with torch.autocast(device_type=precision.device_type, enabled=False):
            (scaler.scale(loss) if scaler is not None else loss).backward()

    with precision.autocast():
        losses = model.forward_backward(micro_batches, teacher_temp=values["teacher_temp"], backward=backward)
    losses = _all_reduce_mean(losses, device)
    if on_gradients is not None:
        on_gradients()
    spike = detector.is_spike(losses["total"])
    if spike and detector.cfg.policy in ("skip", "rollback"):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(losses=losses, spike=True, applied=False)
    norms = apply_update(model, values=values, optimizer=optimizer, precision=precision, clip_grad=clip_grad,
                         student=student, teacher=teacher)
    return StepResult(losses=losses, grad_norms=norms, spike=spike)


def apply_update(model: StepModel, *, values: Mapping[str, float], optimizer: torch.optim.Optimizer,
                 precision: Precision, clip_grad: float, student: nn.ModuleDict,
                 teacher: nn.ModuleDict) -> dict[str, float]:
    """The update half of :func:`train_step`, on the gradients the student holds now.

    Schedule values into the optimizer groups -> (fp16: unscale) -> per-sub-module clipping -> AdamW step ->
    teacher EMA with this step's ``momentum``.

    Returns:
        Each sub-module's gradient norm before clipping.
    """
    apply_schedule(optimizer, values)
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    norms = model.clip_gradients(clip_grad if clip_grad > 0 else None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ema_update(teacher, student, values["momentum"])
    return norms


@torch.no_grad()
def teacher_collapse_indicators(meta: SSLMetaArch, batch: dict, *, teacher_temp: float,
                                precision: Precision) -> dict[str, float]:
    """Collapse indicators of the teacher on this batch's global crops (read-only: centres are not updated)."""
    with precision.autocast():
        out = meta.teacher["backbone"].forward_dino(batch["global_crops"])
        cls = out["x_norm_clstoken"]  # [2B, D]
        logits = meta.teacher["dino_head"](cls)  # [2B, K]
    center = meta.dino_centering.center if meta.config.centering == "centering" else None
    return collapse_indicators(logits, cls, teacher_temp=teacher_temp, center=center)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a batch to ``device`` (other values untouched)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
