"""Per-iteration schedules of the DINOv2 recipe (official ``CosineScheduler`` semantics, float64).

A schedule is the array ``[freeze_iters zeros] + linspace(start_warmup, base, warmup_iters) + cosine`` where
the cosine part over ``n = total - warmup - freeze`` iterations is ``final + (base - final)/2 * (1 + cos(pi i/n))``
for ``i = 0..n-1``. Two official quirks are kept: the warm-up includes its endpoint (the peak value appears
twice in a row), and reading an index ``>= total_iters`` returns ``final_value`` — the teacher-temperature
schedule relies on that: its array covers only the warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import ConfigError


class CosineScheduler:
    """Cosine schedule with optional freeze and linear warm-up.

    Args:
        base_value: value at the end of the warm-up.
        final_value: asymptote of the cosine and the value past the end.
        total_iters: length of the internal array.
        warmup_iters: linear warm-up length (endpoint included).
        start_warmup_value: first warm-up value.
        freeze_iters: leading zeros (unused by the official training script).
    """

    def __init__(self, *, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0) -> None:
        n_cosine = total_iters - warmup_iters - freeze_iters
        if min(total_iters, warmup_iters, freeze_iters, n_cosine) < 0:
            raise ConfigError(f"schedule lengths must be >= 0 with warmup + freeze <= total; got total={total_iters},"
                              f" warmup={warmup_iters}, freeze={freeze_iters}")
        self.final_value = final_value
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.schedule: np.ndarray = np.concatenate((freeze, warmup, cosine))  # [total_iters] float64

    def __getitem__(self, it: int) -> float:
        """Value at iteration ``it`` (``final_value`` past the end)."""
        return float(self.final_value) if it >= self.total_iters else float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


class ScheduleConfig(StrictModel):
    """Schedule hyper-parameters with the official defaults (``ssl_default_config.yaml``)."""

    epochs: int = Field(100, gt=0)
    epoch_length: int = Field(1250, gt=0, description="Iterations per epoch (official OFFICIAL_EPOCH_LENGTH).")
    warmup_epochs: int = Field(10, ge=0)
    base_lr: float = Field(0.004, ge=0)
    lr_scaling: Literal["sqrt_wrt_1024", "none"] = "sqrt_wrt_1024"
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    final_momentum_teacher: float = Field(1.0, ge=0, le=1)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: int = Field(30, ge=0)
    freeze_last_layer_epochs: int = Field(1, ge=0)


def scaled_lr(base_lr: float, global_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """Peak learning rate: ``base_lr * sqrt(global_batch / 1024)`` (official rule) or ``base_lr``."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "none":
        return base_lr
    raise ConfigError(f"unknown lr scaling rule {rule!r} (sqrt_wrt_1024, none)")


@dataclass(frozen=True)
class Schedules:
    """The five schedules the training loop reads at every iteration."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, it: int) -> dict[str, float]:
        """All values at iteration ``it``."""
        return {"lr": self.lr[it], "wd": self.wd[it], "momentum": self.momentum[it],
                "teacher_temp": self.teacher_temp[it], "last_layer_lr": self.last_layer_lr[it]}


def build_schedules(config: ScheduleConfig, *, global_batch_size: int) -> Schedules:
    """The schedules exactly as the official training script builds them (``build_schedulers``).

    Args:
        config: schedule hyper-parameters.
        global_batch_size: images per optimizer step over all ranks (``batch_per_gpu * world``), for the
            learning-rate scaling rule.
    """
    total = config.epochs * config.epoch_length
    peak_lr = scaled_lr(config.base_lr, global_batch_size, config.lr_scaling)
    lr_args = {"base_value": peak_lr, "final_value": config.min_lr, "total_iters": total,
               "warmup_iters": config.warmup_epochs * config.epoch_length, "start_warmup_value": 0.0}
    temp_iters = config.warmup_teacher_temp_epochs * config.epoch_length
    last_layer_lr = CosineScheduler(**lr_args)
    # Official: a copy of the lr schedule whose first freeze_last_layer_epochs epochs are zeroed.
    last_layer_lr.schedule[: config.freeze_last_layer_epochs * config.epoch_length] = 0
    return Schedules(
        lr=CosineScheduler(**lr_args),
        wd=CosineScheduler(base_value=config.weight_decay, final_value=config.weight_decay_end, total_iters=total),
        momentum=CosineScheduler(base_value=config.momentum_teacher, final_value=config.final_momentum_teacher,
                                 total_iters=total),
        teacher_temp=CosineScheduler(base_value=config.teacher_temp, final_value=config.teacher_temp,
                                     total_iters=temp_iters, warmup_iters=temp_iters,
                                     start_warmup_value=config.warmup_teacher_temp),
        last_layer_lr=last_layer_lr,
    )
