"""Parity of the full training step (``train_step_*`` fixtures): official ``SSLMetaArch.forward_backward``,
per-sub-module clipping, AdamW and the teacher EMA, plus the drop-path re-run with the stored row draws.

For every stored step the handler compares (README tolerances):

* the collate bookkeeping (indices, weights, counts, ``upperbound``);
* every intermediate (teacher logits and targets, centres, student logits, CLS tokens, KoLeo per crop,
  the raw iBOT value) from a copy of the model driven piece by piece;
* the loss values and every student gradient from :meth:`SSLMetaArch.forward_backward` itself.

After a step with stored ``student_after_<step>`` weights, the optimizer step is checked twice: fed with the
*stored* gradients (1e-6) and chained from our own gradients (1e-4: the first Adam step is ~lr*sign(g), so
elements with |g| ~ 1e-6 are sensitive to the last bits of g — README "AdamW note"). The next step then runs
on our chained state, as a real run would.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from dinoforge.core.backbone.block import kept_rows
from dinoforge.core.parity import Check, Tolerances, check_abs, check_exact, check_maxnorm, check_rel
from dinoforge.pretrain.losses import ibot_masked_loss, koleo_loss
from dinoforge.pretrain.masking import Batch, collate_upperbound, mask_statistics
from dinoforge.pretrain.meta_arch import SSLMetaArch
from dinoforge.pretrain.optim import build_optimizer
from dinoforge.pretrain.parity.base import GuardedHandler
from dinoforge.pretrain.parity.fixture_models import (
    config_value,
    load_official_student,
    load_official_tree,
    meta_arch_config,
    official_name_map,
    official_named,
    step_batch,
)
from dinoforge.pretrain.param_groups import apply_optim_scheduler

CHAINED_STATE_ABS = 1e-4  # README: optimizer state after our own float32 gradients
_LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total")


class DrawMismatch(Exception):
    """The model asked for a drop-path subset the fixture did not draw (order, group size or count)."""


class StoredDraws:
    """Replays the stored efficient-stochastic-depth row subsets in the official draw order."""

    def __init__(self, fixture: Mapping[str, Any], prefix: str) -> None:
        n = int(fixture[f"{prefix}/num_droppath_draws"])
        self.draws = [(fixture[f"{prefix}/draw{q}/kept_indices"], int(fixture[f"{prefix}/draw{q}/group_batch"]))
                      for q in range(n)]
        self.used = 0

    def __call__(self, batch: int, keep: int, device: torch.device) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise DrawMismatch(f"the model asked for more than the {len(self.draws)} stored draws")
        kept, group_batch = self.draws[self.used]
        if (batch, keep) != (group_batch, kept.numel()):
            raise DrawMismatch(f"draw {self.used}: model wants {keep} of {batch} rows, fixture kept "
                               f"{kept.numel()} of {group_batch}")
        self.used += 1
        return kept.to(device)

    def install(self, model: SSLMetaArch) -> StoredDraws:
        for block in model.student["backbone"].blocks:
            block.row_sampler = self
        return self


class TrainStepHandler(GuardedHandler):
    """Full official training step(s) of a tiny ViT with DINO + iBOT + KoLeo."""

    name = "train_step"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"student_param_names", "step0/loss/total", "step0/global_crops"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        model = self._fresh(fixture)
        optimizer = None
        checks: list[Check] = []
        for s in range(int(fixture.get("num_steps", 1))):
            step = f"step{s}"
            batch = step_batch(fixture, step)
            checks += self._collate(fixture, batch, f"{source}:{step}")
            checks += self._step(model, fixture, batch, step, source, tol, draws_prefix=None)
            if any(k.startswith(f"student_after_{step}/") for k in fixture):
                checks += self._stored_grad_update(fixture, step, source, tol)
                optimizer = optimizer or build_optimizer(model.get_params_groups(**_group_args(fixture)),
                                                         **_adamw_args(fixture))
                checks += self._update(model, optimizer, fixture, step, source, tol, stored_grads=False)
                # The next step starts from the reference weights: chained float32 gradients legitimately move
                # near-zero-gradient elements by a few % of lr (README's AdamW note), which would otherwise be
                # billed to the next step's forward. Centres and optimizer moments carry on as ours.
                load_official_tree(model.student, fixture, f"student_after_{step}/")
                load_official_tree(model.teacher, fixture, f"teacher_after_{step}/")
        if "droppath_step0/num_droppath_draws" in fixture:
            checks += self._droppath(fixture, source, tol)
        return checks

    # ------------------------------------------------------------------ building
    def _fresh(self, fx: Mapping[str, Any], **overrides: Any) -> SSLMetaArch:
        model = SSLMetaArch(meta_arch_config(fx, **overrides))
        load_official_student(model, fx)
        return model.train()

    def _collate(self, fx: Mapping[str, Any], batch: Batch, case: str) -> list[Check]:
        stats = mask_statistics(batch["masks"])
        ratio = tuple(float(r) for r in config_value(fx, "mask_ratio_min_max"))
        upper = collate_upperbound(batch["masks"].shape[0], batch["masks"].shape[1], mask_ratio_min_max=ratio,
                                   mask_probability=float(config_value(fx, "mask_sample_probability")))
        return [check_exact(f"{case}/mask_indices", stats["mask_indices"], batch["mask_indices"]),
                check_abs(f"{case}/masks_weight", stats["masks_weight"], batch["masks_weight"], 0.0),
                check_exact(f"{case}/n_masked_patches", stats["n_masked_patches"], batch["n_masked_patches"]),
                check_exact(f"{case}/upperbound", upper, batch["upperbound"])]

    # ------------------------------------------------------------------ one forward/backward
    def _step(self, model: SSLMetaArch, fx: Mapping[str, Any], batch: Batch, out: str, source: str,
              tol: Tolerances, draws_prefix: str | None) -> list[Check]:
        temp = float(fx[f"{out}/teacher_temp"])
        probe = copy.deepcopy(model)
        probe_draws = StoredDraws(fx, draws_prefix).install(probe) if draws_prefix else None
        try:
            checks = self._intermediates(probe, fx, batch, temp, out, source, tol)
        except DrawMismatch as err:
            return [Check(case=f"{source}:{out}/droppath_draws", metric="exact", error=float("inf"), tolerance=0.0,
                          note=str(err))]
        draws = StoredDraws(fx, draws_prefix).install(model) if draws_prefix else None
        model.zero_grad(set_to_none=True)
        logged = model.forward_backward([batch], teacher_temp=temp)
        for key in _LOSS_KEYS:
            if f"{out}/loss/{key}" in fx:
                checks.append(check_rel(f"{source}:{out}/loss/{key}", torch.tensor(logged.get(key, float("nan"))),
                                        fx[f"{out}/loss/{key}"], tol.get("loss_rel")))
        grads = official_named(model.student, grads=True)
        for name in fx["student_param_names"]:
            ours = grads.get(name)
            ref = fx[f"{out}/grad/{name}"]
            checks.append(check_maxnorm(f"{source}:{out}/grad/{name}", torch.zeros_like(ref) if ours is None else ours,
                                        ref, tol.get("grad_maxnorm")))
        if draws is not None and probe_draws is not None:
            checks.append(check_exact(f"{source}:{out}/droppath_draws_used", [probe_draws.used, draws.used],
                                      [len(draws.draws)] * 2))
        return checks

    def _intermediates(self, probe: SSLMetaArch, fx: Mapping[str, Any], batch: Batch, temp: float, out: str,
                       source: str, tol: Tolerances) -> list[Check]:
        used = {"dino_center_used": probe.dino_centering.center.clone(),
                "ibot_center_used": probe.ibot_centering.center.clone()}
        raw = probe.teacher_logits(batch)
        teacher = probe.normalize_teacher([raw], teacher_temp=temp)[0]
        with torch.no_grad():
            student = probe.get_student_output(batch)
            koleo = torch.stack([koleo_loss(c) for c in student.global_cls_tokens.chunk(2)])
            ibot_value = ibot_masked_loss(student.masked_patch_logits, teacher.ibot_probs, batch["masks_weight"],
                                          n_global_crops_total=batch["masks"].shape[0],
                                          student_temp=probe.config.student_temp)
        ours = {**used, "dino_center_next": probe.dino_centering.center,
                "ibot_center_next": probe.ibot_centering.center,
                "teacher_dino_logits_swapped": raw.dino_logits, "teacher_dino_probs_swapped": teacher.dino_probs,
                "teacher_ibot_logits": raw.ibot_logits, "teacher_ibot_probs": teacher.ibot_probs,
                "student_local_cls_logits": student.local_cls_logits,
                "student_global_cls_logits": student.global_cls_logits,
                "student_masked_patch_logits": student.masked_patch_logits,
                "student_global_cls_tokens": student.global_cls_tokens}
        checks = [check_abs(f"{source}:{out}/{key}", value, fx[f"{out}/{key}"], tol.get("probs_abs"))
                  for key, value in ours.items() if f"{out}/{key}" in fx]
        for key, value in (("koleo_per_global_crop", koleo), ("ibot_forward_masked_value", ibot_value)):
            if f"{out}/{key}" in fx:
                checks.append(check_rel(f"{source}:{out}/{key}", value, fx[f"{out}/{key}"], tol.get("loss_rel")))
        return checks

    # ------------------------------------------------------------------ optimizer step + EMA
    def _stored_grad_update(self, fx: Mapping[str, Any], step: str, source: str, tol: Tolerances) -> list[Check]:
        model = self._fresh(fx)
        names = official_name_map(model.student)
        for ours, official in names.items():
            sub, _, rest = ours.partition(".")
            model.student[sub].get_parameter(rest).grad = fx[f"{step}/grad/{official}"].clone()
        optimizer = build_optimizer(model.get_params_groups(**_group_args(fx)), **_adamw_args(fx))
        return self._update(model, optimizer, fx, step, source, tol, stored_grads=True)

    def _update(self, model: SSLMetaArch, optimizer: torch.optim.Optimizer, fx: Mapping[str, Any], step: str,
                source: str, tol: Tolerances, *, stored_grads: bool) -> list[Check]:
        tag = "stored_grads" if stored_grads else "chained"
        apply_optim_scheduler(optimizer, lr=float(fx[f"{step}/lr"]), wd=float(fx[f"{step}/wd"]),
                              last_layer_lr=float(fx[f"{step}/last_layer_lr"]))
        norms = model.clip_gradients(float(config_value(fx, "clip_grad")))
        checks = [check_rel(f"{source}:{step}/{tag}/grad_norm_before_clip/{sub}", torch.tensor(norm),
                            fx[f"{step}/grad_norm_before_clip/{sub}"], tol.get("loss_rel"))
                  for sub, norm in norms.items() if f"{step}/grad_norm_before_clip/{sub}" in fx]
        optimizer.step()
        model.update_teacher(float(fx[f"{step}/momentum"]))
        bound = tol.get("state_after_step_abs") if stored_grads else CHAINED_STATE_ABS * tol.scale
        for tree in ("student", "teacher"):
            state = official_named(getattr(model, tree))
            worst = max((check_abs(f"{source}:{tree}_after_{step}/{name}", state[name],
                                   fx[f"{tree}_after_{step}/{name}"], bound) for name in fx["student_param_names"]),
                        key=lambda c: c.error)
            checks.append(Check(case=f"{source}:{tree}_after_{step}/{tag}", metric="abs", error=worst.error,
                                tolerance=bound, max_abs=worst.max_abs,
                                note=f"worst tensor {worst.case.rsplit('/', 1)[-1]}" + (f"; {worst.note}" if worst.note
                                                                                          else "")))
        return checks

    # ------------------------------------------------------------------ drop path
    def _droppath(self, fx: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        prefix = "droppath_step0"
        rate = float(fx[f"{prefix}/drop_path_rate"])
        n = int(fx[f"{prefix}/num_droppath_draws"])
        draws = StoredDraws(fx, prefix).draws
        # Our block rescales a kept subset by batch / kept (``Block._drop_add``); the stored scales must agree.
        scales = torch.tensor([b / k.numel() for k, b in draws], dtype=torch.float64)
        ref_scales = torch.tensor([float(fx[f"{prefix}/draw{q}/scale"]) for q in range(n)], dtype=torch.float64)
        checks = [check_exact(f"{source}:{prefix}/num_droppath_draws", n, 4 * int(config_value(fx, "depth"))),
                  check_exact(f"{source}:{prefix}/kept_counts", [kept_rows(b, rate) for _, b in draws],
                              [k.numel() for k, _ in draws]),
                  check_abs(f"{source}:{prefix}/scales", scales, ref_scales, tol.get("schedule_abs"))]
        uniform = bool(fx.get(f"{prefix}/drop_path_uniform", True))
        model = self._fresh(fx, drop_path_rate=rate, drop_path_uniform=uniform)
        return checks + self._step(model, fx, step_batch(fx, "step0"), prefix, source, tol, draws_prefix=prefix)


def _group_args(fx: Mapping[str, Any]) -> dict[str, float]:
    return {"layerwise_decay": float(config_value(fx, "layerwise_decay")),
            "patch_embed_lr_mult": float(config_value(fx, "patch_embed_lr_mult"))}


def _adamw_args(fx: Mapping[str, Any]) -> dict[str, Any]:
    betas = config_value(fx, "adamw_betas")
    return {"betas": (float(betas[0]), float(betas[1])), "eps": float(fx.get("config/adamw_eps", 1e-8))}
