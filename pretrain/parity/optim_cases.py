"""Parity of the schedules and the optimizer parameter groups (``schedules`` and ``param_groups`` fixtures).

The groups are read back from the optimizer :func:`~dinoforge.pretrain.optim.build_optimizer` builds for a run,
and the effective values from its :func:`~dinoforge.pretrain.optim.apply_schedule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dinoforge.core.backbone import BackboneConfig
from dinoforge.core.parity import Check, Tolerances, check_abs, check_exact
from dinoforge.pretrain.meta_arch import HeadShape, MetaArchConfig, build_student
from dinoforge.pretrain.optim import OptimConfig, apply_schedule, build_optimizer
from dinoforge.pretrain.parity.base import GuardedHandler
from dinoforge.pretrain.parity.fixture_models import official_name_map
from dinoforge.pretrain.param_groups import iter_group_names
from dinoforge.pretrain.schedules import CosineScheduler, ScheduleConfig, build_schedules, scaled_lr

_SCHEDULE_NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


class SchedulesHandler(GuardedHandler):
    """``build_schedulers`` of the training script and direct ``CosineScheduler`` calls."""

    name = "schedules"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"lr_raw_schedule", "teacher_temp_raw_schedule", "num_evaluated"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        c = {k.removeprefix("config/"): v for k, v in fixture.items() if k.startswith("config/")}
        config = ScheduleConfig(
            epochs=c["epochs"], epoch_length=c["OFFICIAL_EPOCH_LENGTH"], warmup_epochs=c["warmup_epochs"],
            base_lr=c["base_lr"], min_lr=c["min_lr"], weight_decay=c["weight_decay"],
            weight_decay_end=c["weight_decay_end"], momentum_teacher=c["momentum_teacher"],
            final_momentum_teacher=c["final_momentum_teacher"], warmup_teacher_temp=c["warmup_teacher_temp"],
            teacher_temp=c["teacher_temp"], warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
            freeze_last_layer_epochs=c["freeze_last_layer_epochs"])
        batch = int(c["batch_size_per_gpu"]) * int(c["world_size"])
        schedules = build_schedules(config, global_batch_size=batch)
        t = tol.get("schedule_abs")
        checks = [check_abs(f"{source}:lr_after_sqrt_scaling", scaled_lr(config.base_lr, batch),
                            float(c["lr_after_sqrt_scaling"]), t),
                  check_exact(f"{source}:total_iters", len(schedules.lr), int(fixture["total_iters"]))]
        n_eval = int(fixture["num_evaluated"])
        for name in _SCHEDULE_NAMES:
            scheduler: CosineScheduler = getattr(schedules, name)
            values = torch.tensor([scheduler[it] for it in range(n_eval)], dtype=torch.float64)
            checks.append(check_abs(f"{source}:{name}", values, fixture[name], t))
            checks.append(check_abs(f"{source}:{name}_raw_schedule", torch.from_numpy(scheduler.schedule),
                                    fixture[f"{name}_raw_schedule"], t))
        for k in range(int(fixture.get("num_direct", 0))):
            checks.append(self._direct(fixture, f"direct{k}", source, t))
        return checks

    def _direct(self, fx: Mapping[str, Any], key: str, source: str, t: float) -> Check:
        args = {name: fx[f"{key}/{name}"] for name in
                ("base_value", "final_value", "total_iters", "warmup_iters", "start_warmup_value", "freeze_iters")}
        scheduler = CosineScheduler(**args)
        ref = fx[f"{key}/values"]
        values = torch.tensor([scheduler[it] for it in range(ref.numel())], dtype=torch.float64)
        return check_abs(f"{source}:{key}/values", values, ref, t)


def _student_from_config(fx: Mapping[str, Any]) -> torch.nn.ModuleDict:
    c = {k.removeprefix("config/"): v for k, v in fx.items() if k.startswith("config/")}
    patch = int(c.get("patch_size", 14))
    backbone = BackboneConfig(embed_dim=int(c["embed_dim"]), depth=int(c["depth"]), num_heads=int(c["num_heads"]),
                              patch_size=patch, img_size=int(c["global_crops_size"]),
                              num_register_tokens=int(c.get("num_register_tokens", 0)))
    dims = {"hidden_dim": int(c["head_hidden_dim"]), "bottleneck_dim": int(c["head_bottleneck_dim"])}
    return build_student(MetaArchConfig(
        backbone=backbone, dino_head=HeadShape(out_dim=int(c["dino_K"]), **dims),
        ibot_head=HeadShape(out_dim=int(c.get("ibot_K", c["dino_K"])), **dims),
        ibot_separate_head=bool(c.get("ibot_separate_head", False))))


class ParamGroupsHandler(GuardedHandler):
    """Per-parameter lr / wd multipliers, last-layer flags, fused groups and scheduled effective values."""

    name = "param_groups"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"lr_multiplier", "wd_multiplier", "optimizer_group_index", "param_names"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        student = _student_from_config(fixture)
        betas = fixture["config/adamw_betas"]
        # The optimizer the trainer builds; its groups are the fused parameter groups (with their names).
        optimizer = build_optimizer(student, OptimConfig(
            betas=(float(betas[0]), float(betas[1])), layerwise_decay=float(fixture["config/layerwise_decay"]),
            patch_embed_lr_mult=float(fixture["config/patch_embed_lr_mult"])))
        groups = optimizer.param_groups
        official = official_name_map(student)
        index = {official[n]: i for i, n in iter_group_names(groups)}
        names = list(fixture["param_names"])
        checks = [check_exact(f"{source}:param_names", sorted(index), sorted(names)),
                  check_exact(f"{source}:num_optimizer_groups", len(groups), int(fixture["num_optimizer_groups"]))]
        if sorted(index) != sorted(names):
            return checks
        params = {official[n]: p for g in groups for n, p in zip(g["names"], g["params"], strict=True)}
        shapes = [" ".join(str(d) for d in params[n].shape) for n in names]
        checks.append(check_exact(f"{source}:param_shapes", shapes, list(fixture["param_shapes"])))
        per_param = {key: [groups[index[n]][key] for n in names] for key in ("lr_multiplier", "wd_multiplier",
                                                                              "is_last_layer")}
        t = tol.get("schedule_abs")
        checks += [
            check_abs(f"{source}:lr_multiplier", torch.tensor(per_param["lr_multiplier"], dtype=torch.float64),
                      fixture["lr_multiplier"], t),
            check_abs(f"{source}:wd_multiplier", torch.tensor(per_param["wd_multiplier"], dtype=torch.float64),
                      fixture["wd_multiplier"], t),
            check_exact(f"{source}:is_last_layer", torch.tensor(per_param["is_last_layer"]), fixture["is_last_layer"]),
            check_exact(f"{source}:optimizer_group_index", torch.tensor([index[n] for n in names]),
                        fixture["optimizer_group_index"]),
        ]
        for state in ("frozen_last_layer", "live_last_layer"):
            if f"{state}/effective_lr" in fixture:
                checks += self._effective(fixture, optimizer, state, names, index, source, t)
        return checks

    def _effective(self, fx: Mapping[str, Any], optimizer: torch.optim.Optimizer, state: str, names: list[str],
                   index: Mapping[str, int], source: str, t: float) -> list[Check]:
        apply_schedule(optimizer, {"lr": float(fx["config/base_lr"]), "wd": float(fx["config/weight_decay"]),
                                   "last_layer_lr": float(fx[f"{state}/last_layer_lr"])})
        lr = torch.tensor([optimizer.param_groups[index[n]]["lr"] for n in names], dtype=torch.float64)
        wd = torch.tensor([optimizer.param_groups[index[n]]["weight_decay"] for n in names], dtype=torch.float64)
        return [check_abs(f"{source}:{state}/effective_lr", lr, fx[f"{state}/effective_lr"], t),
                check_abs(f"{source}:{state}/effective_weight_decay", wd, fx[f"{state}/effective_weight_decay"], t)]
