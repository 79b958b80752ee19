"""The optimizer of the DINOv2 recipe in one place: build it, apply the schedules, clip, update the EMA teacher.

These are the official optimisation mechanics:

* one AdamW over the fused parameter groups of :mod:`dinoforge.pretrain.param_groups` (:func:`build_optimizer`);
* before every step each group's lr and weight decay are set from the schedule values and the group's
  multipliers (:func:`apply_schedule`);
* gradients clipped to ``max_norm`` *separately for each student sub-module* (``backbone``, ``dino_head``
  [, ``ibot_head``]) with ``coef = min(1, max_norm / (norm + 1e-6))`` (:func:`clip_grad_norms`);
* the teacher update ``t <- m * t + (1 - m) * s`` over every parameter (:func:`ema_update`), the one EMA of the
  project (pretraining's teacher, distillation's student EMA).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field
from torch import nn

from dinoforge.core.config import StrictModel
from dinoforge.pretrain.param_groups import param_groups


class OptimConfig(StrictModel):
    """AdamW and the official parameter-group rule."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(3.0, ge=0, description="per student sub-module; 0 disables clipping")
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)


def build_optimizer(student: Mapping[str, nn.Module], cfg: OptimConfig, *,
                    foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the recipe's parameter groups of ``student`` (official betas 0.9 / 0.999, eps 1e-8).

    Learning rates and weight decays are placeholders until :func:`apply_schedule` sets them before each step.

    Args:
        student: the *unwrapped* sub-modules in order (``{"backbone": ..., "dino_head": ...}``).
        cfg: betas, eps and the group rule (layer-wise decay, patch-embedding lr factor).
        foreach: torch's multi-tensor implementation (``None``: torch's default for the device).
    """
    groups = param_groups(student, layerwise_decay=cfg.layerwise_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, foreach=foreach)


def apply_schedule(optimizer: torch.optim.Optimizer, values: Mapping[str, float]) -> None:
    """Set every group's lr and weight decay from this iteration's schedule values (official rule).

    ``lr_group = (last_layer_lr if is_last_layer else lr) * lr_multiplier``, ``wd_group = wd * wd_multiplier``.

    Args:
        optimizer: from :func:`build_optimizer` (its groups carry the multipliers).
        values: at least ``lr``, ``wd`` and ``last_layer_lr``.
    """
    for group in optimizer.param_groups:
        base = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]


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
def ema_update(teacher: Mapping[str, nn.Module], student: Mapping[str, nn.Module], momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for every sub-module of ``student``, in place.

    Frozen student parameters (``requires_grad=False``, such as a hybrid's pretrained stem) are skipped: the
    teacher's copy is already equal, and ``m * t + (1 - m) * t`` would drift from it by rounding.

    Works for plain, DDP-replicated and FSDP2-sharded pairs (teacher and student sharded the same way: the
    update is then purely local to each rank's shards).

    Args:
        teacher, student: the *unwrapped* module dicts; every student key must be in ``teacher``.

    Raises:
        ValueError: a sub-module pair differs in parameter count or shapes.
    """
    for key, module in student.items():
        t_all, s_all = list(teacher[key].parameters()), list(module.parameters())
        if len(t_all) != len(s_all) or any(t.shape != s.shape for t, s in zip(t_all, s_all, strict=True)):
            raise ValueError(f"EMA teacher and student {key!r} parameters do not match one to one")
        pairs = [(_local(t), _local(s)) for t, s in zip(t_all, s_all, strict=True) if s.requires_grad]
        t_params, s_params = [t for t, _ in pairs], [s for _, s in pairs]
        if t_params:
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself otherwise)."""
    return p.to_local() if hasattr(p, "to_local") else p
