"""AdamW from the recipe's parameter groups, per-sub-module gradient clipping and the EMA teacher update.

These are the official optimisation mechanics without FSDP: one AdamW over the fused groups of
:mod:`dinoforge.pretrain.param_groups`; gradients clipped to ``max_norm`` *separately for each student
sub-module* (``backbone``, ``dino_head``[, ``ibot_head``]) with ``coef = min(1, max_norm / (norm + 1e-6))``;
and the teacher update ``t <- m * t + (1 - m) * s`` over every parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def build_optimizer(groups: Sequence[dict[str, Any]], *, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the recipe's parameter groups (official betas 0.9 / 0.999, eps 1e-8).

    Learning rates and weight decays are placeholders until
    :func:`~dinoforge.pretrain.param_groups.apply_optim_scheduler` sets them before each step.

    Args:
        groups: from :func:`~dinoforge.pretrain.param_groups.param_groups`.
        betas: Adam betas.
        eps: Adam epsilon.
        foreach: torch's multi-tensor implementation (``None``: torch's default for the device).
    """
    return torch.optim.AdamW(list(groups), betas=betas, eps=eps, foreach=foreach)


def clip_grad_norms(modules: Mapping[str, nn.Module], max_norm: float | None) -> dict[str, float]:
    """Clip each module's gradients to total L2 norm ``max_norm`` on its own (official per-sub-module rule).

    Args:
        modules: e.g. ``{"backbone": ..., "dino_head": ...}``.
        max_norm: bound; ``None`` or ``<= 0`` only measures.

    Returns:
        The norm of each module's gradients *before* clipping.
    """
    norms: dict[str, float] = {}
    for key, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            norms[key] = 0.0
            continue
        # An infinite bound measures without clipping (the coefficient clamps to 1).
        bound = float("inf") if max_norm is None or max_norm <= 0 else max_norm
        norm = torch.nn.utils.clip_grad_norm_(params, bound)
        if hasattr(norm, "full_tensor"):  # FSDP2 / DTensor gradients: materialise the reduced norm
            norm = norm.full_tensor()
        norms[key] = float(norm)
    return norms


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for matching tensors, in place.

    Raises:
        ValueError: the two iterables differ in length or shapes (teacher and student must mirror each other).
    """
    teacher_list, student_list = list(teacher), list(student)
    if len(teacher_list) != len(student_list) or any(t.shape != s.shape for t, s in zip(teacher_list, student_list)):
        raise ValueError("EMA teacher and student parameters do not match one to one")
    if not teacher_list:
        return
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, student_list, alpha=1 - momentum)
