"""Parity of the training step that ``dinoforge pretrain`` runs (``train_step_*`` fixtures).

Every stored step goes through the real :func:`~dinoforge.pretrain.train_loop.train_step` on an
:class:`SSLMetaArch` holding the fixture's weights, with what the trainer builds around it: the optimizer of
:func:`~dinoforge.pretrain.optim.build_optimizer` (official parameter groups), fp32 precision, the loss-spike
detector, the fixture's ``clip_grad`` and the step's schedule values. The handler compares (README
tolerances):

* the collate bookkeeping (indices, weights, counts, ``upperbound``);
* from the real step: the loss values, every student gradient before clipping (read through the step's
  ``on_gradients`` hook), the norms before clipping, the centres before and after the step and, where the
  fixture stores them (``student_after_<step>``), the student and teacher after AdamW and the EMA;
* diagnostics that locate a failure: teacher logits and targets, student logits, CLS tokens, KoLeo per crop
  and the raw iBOT value, from a copy of the model taken before the step and driven piece by piece.

Where the fixture stores no schedule values for a step (the last step, the drop-path re-run, the one-step
variants) the step runs with a null update (lr 0, momentum 1): forward, backward, centres and clipping are
checked and the weights stay as they were.

The update is checked twice. :func:`~dinoforge.pretrain.train_loop.apply_update` (the update half of the
step) fed with the *stored* gradients must match to 1e-6. The state after the whole step, chained from our
own gradients, must match to 1e-4 for the student (the first Adam step is ~lr*sign(g), so elements with
|g| ~ 1e-6 are sensitive to the last bits of g: README "AdamW note") and to ``1 - momentum`` times that for
the teacher, which moves by that fraction of the student's move. The next step starts from the reference
weights; centres and optimizer moments carry on as ours.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dinoforge.core.backbone.block import kept_rows
from dinoforge.core.parity import Check, Tolerances, check_abs, check_exact, check_maxnorm, check_rel
from dinoforge.pretrain.losses import ibot_masked_loss, koleo_loss
from dinoforge.pretrain.masking import Batch, collate_upperbound, mask_statistics
from dinoforge.pretrain.meta_arch import SSLMetaArch
from dinoforge.pretrain.optim import OptimConfig, build_optimizer
from dinoforge.pretrain.parity.base import GuardedHandler
from dinoforge.pretrain.parity.draws import DrawMismatch, StoredDraws
from dinoforge.pretrain.parity.fixture_models import (
    config_value,
    load_official_student,
    load_official_tree,
    meta_arch_config,
    official_name_map,
    official_named,
    step_batch,
)
from dinoforge.pretrain.spikes import SpikeConfig, SpikeDetector
from dinoforge.pretrain.train_loop import Precision, StepResult, apply_update, make_precision, train_step

CHAINED_STATE_ABS = 1e-4  # README: optimizer state after our own float32 gradients
_LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total")
_UPDATE_KEYS = ("lr", "wd", "last_layer_lr", "momentum")
_NULL_UPDATE = {"lr": 0.0, "wd": 0.0, "last_layer_lr": 0.0, "momentum": 1.0}  # AdamW and EMA leave weights as is


@dataclass
class StepRun:
    """A model with the fixture's weights and the collaborators the trainer gives its training step."""

    model: SSLMetaArch
    optim: OptimConfig
    optimizer: torch.optim.Optimizer
    precision: Precision
    detector: SpikeDetector

    @classmethod
    def build(cls, fixture: Mapping[str, Any], **overrides: Any) -> StepRun:
        """Student and teacher = ``student_init/*``; optimizer and spike detector built as the trainer builds them."""
        model = SSLMetaArch(meta_arch_config(fixture, **overrides))
        load_official_student(model, fixture)
        optim = optim_config(fixture)
        return cls(model.train(), optim, build_optimizer(model.student, optim),
                   make_precision("fp32", torch.device("cpu")), SpikeDetector(SpikeConfig()))

    def step(self, batch: Batch, values: Mapping[str, float], grads: dict[str, torch.Tensor]) -> StepResult:
        """One real training step; ``grads`` receives the gradients before clipping (official names)."""
        return train_step(self.model, [batch], values=values, optimizer=self.optimizer, precision=self.precision,
                          clip_grad=self.optim.clip_grad, detector=self.detector, student=self.model.student,
                          teacher=self.model.teacher, device=torch.device("cpu"),
                          on_gradients=lambda: grads.update(_snapshot(self.model.student)))

    def update(self, values: Mapping[str, float]) -> dict[str, float]:
        """The update half of the step on the gradients the student holds; returns the norms before clipping."""
        return apply_update(self.model, values=values, optimizer=self.optimizer, precision=self.precision,
                            clip_grad=self.optim.clip_grad, student=self.model.student, teacher=self.model.teacher)


def optim_config(fixture: Mapping[str, Any]) -> OptimConfig:
    """The recipe's optimizer section a train-step fixture was generated with."""
    betas = config_value(fixture, "adamw_betas")
    return OptimConfig(betas=(float(betas[0]), float(betas[1])), eps=float(fixture.get("config/adamw_eps", 1e-8)),
                       clip_grad=float(config_value(fixture, "clip_grad")),
                       layerwise_decay=float(config_value(fixture, "layerwise_decay")),
                       patch_embed_lr_mult=float(config_value(fixture, "patch_embed_lr_mult")))


def schedule_values(fixture: Mapping[str, Any], step: str) -> dict[str, float]:
    """The step's schedule values, or a null update where the fixture stores none (see the module docstring)."""
    stored = all(f"{step}/{k}" in fixture for k in _UPDATE_KEYS)
    values = {k: float(fixture[f"{step}/{k}"]) for k in _UPDATE_KEYS} if stored else dict(_NULL_UPDATE)
    return {**values, "teacher_temp": float(fixture[f"{step}/teacher_temp"])}


def _snapshot(student: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Copies of the student's gradients under official names (clipping then modifies them in place)."""
    return {name: grad.clone() for name, grad in official_named(student, grads=True).items() if grad is not None}


class TrainStepHandler(GuardedHandler):
    """Full official training step(s) of a tiny ViT with DINO + iBOT + KoLeo."""

    name = "train_step"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"student_param_names", "step0/loss/total", "step0/global_crops"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        run = StepRun.build(fixture)
        checks: list[Check] = []
        for s in range(int(fixture.get("num_steps", 1))):
            step = f"step{s}"
            batch = step_batch(fixture, step)
            checks += self._collate(fixture, batch, f"{source}:{step}")
            checks += self._step(run, fixture, batch, step, source, tol)
            if any(k.startswith(f"student_after_{step}/") for k in fixture):
                checks += self._stored_grad_update(fixture, step, source, tol)
                checks += self._state_after(run.model, fixture, step, source, tol, stored_grads=False)
                # Chained float32 gradients legitimately move near-zero-gradient elements by a few % of lr
                # (README's AdamW note), which would otherwise be billed to the next step's forward.
                load_official_tree(run.model.student, fixture, f"student_after_{step}/")
                load_official_tree(run.model.teacher, fixture, f"teacher_after_{step}/")
        if "droppath_step0/num_droppath_draws" in fixture:
            checks += self._droppath(fixture, source, tol)
        return checks

    def _collate(self, fx: Mapping[str, Any], batch: Batch, case: str) -> list[Check]:
        stats = mask_statistics(batch["masks"])
        ratio = tuple(float(r) for r in config_value(fx, "mask_ratio_min_max"))
        upper = collate_upperbound(batch["masks"].shape[0], batch["masks"].shape[1], mask_ratio_min_max=ratio,
                                   mask_probability=float(config_value(fx, "mask_sample_probability")))
        return [check_exact(f"{case}/mask_indices", stats["mask_indices"], batch["mask_indices"]),
                check_abs(f"{case}/masks_weight", stats["masks_weight"], batch["masks_weight"], 0.0),
                check_exact(f"{case}/n_masked_patches", stats["n_masked_patches"], batch["n_masked_patches"]),
                check_exact(f"{case}/upperbound", upper, batch["upperbound"])]

    # ------------------------------------------------------------------ one real training step
    def _step(self, run: StepRun, fx: Mapping[str, Any], batch: Batch, out: str, source: str, tol: Tolerances,
              draws_prefix: str | None = None) -> list[Check]:
        values = schedule_values(fx, out)
        probe = copy.deepcopy(run.model)
        probe_draws = StoredDraws(fx, draws_prefix).install(probe.student) if draws_prefix else None
        try:
            checks = self._intermediates(probe, fx, batch, values["teacher_temp"], out, source, tol)
        except DrawMismatch as err:
            return [Check(case=f"{source}:{out}/droppath_draws", metric="exact", error=float("inf"), tolerance=0.0,
                          note=str(err))]
        draws = StoredDraws(fx, draws_prefix).install(run.model.student) if draws_prefix else None
        checks += self._centres(run.model, fx, out, "used", source, tol)
        grads: dict[str, torch.Tensor] = {}
        result = run.step(batch, values, grads)
        if not result.applied:
            checks.append(Check(case=f"{source}:{out}/step_applied", metric="exact", error=float("inf"),
                                tolerance=0.0, note="the loss-spike detector skipped the update"))
        checks += self._centres(run.model, fx, out, "next", source, tol)
        for key in _LOSS_KEYS:
            if f"{out}/loss/{key}" in fx:
                checks.append(check_rel(f"{source}:{out}/loss/{key}",
                                        torch.tensor(result.losses.get(key, float("nan"))), fx[f"{out}/loss/{key}"],
                                        tol.get("loss_rel")))
        for name in fx["student_param_names"]:
            ref = fx[f"{out}/grad/{name}"]
            checks.append(check_maxnorm(f"{source}:{out}/grad/{name}", grads.get(name, torch.zeros_like(ref)), ref,
                                        tol.get("grad_maxnorm")))
        checks += self._norms(result.grad_norms, fx, out, "chained", source, tol)
        if draws is not None and probe_draws is not None:
            checks.append(check_exact(f"{source}:{out}/droppath_draws_used", [probe_draws.used, draws.used],
                                      [len(draws.draws)] * 2))
        return checks

    def _centres(self, model: SSLMetaArch, fx: Mapping[str, Any], out: str, which: str, source: str,
                 tol: Tolerances) -> list[Check]:
        """The real model's DINO/iBOT centres against ``<out>/<head>_center_<which>`` (centering variants)."""
        checks = []
        for head in ("dino", "ibot"):
            key = f"{out}/{head}_center_{which}"
            if key in fx:
                centre = getattr(model, f"{head}_centering").center
                checks.append(check_abs(f"{source}:{key}", centre, fx[key], tol.get("probs_abs")))
        return checks

    def _norms(self, norms: Mapping[str, float], fx: Mapping[str, Any], step: str, tag: str, source: str,
               tol: Tolerances) -> list[Check]:
        return [check_rel(f"{source}:{step}/{tag}/grad_norm_before_clip/{sub}", torch.tensor(norm),
                          fx[f"{step}/grad_norm_before_clip/{sub}"], tol.get("loss_rel"))
                for sub, norm in norms.items() if f"{step}/grad_norm_before_clip/{sub}" in fx]

    def _intermediates(self, probe: SSLMetaArch, fx: Mapping[str, Any], batch: Batch, temp: float, out: str,
                       source: str, tol: Tolerances) -> list[Check]:
        """Diagnostics from a copy of the model: which part of the step a failure comes from."""
        raw = probe.teacher_logits(batch)
        teacher = probe.normalize_teacher([raw], teacher_temp=temp)[0]
        with torch.no_grad():
            student = probe.get_student_output(batch)
            koleo = torch.stack([koleo_loss(c) for c in student.global_cls_tokens.chunk(2)])
            ibot_value = ibot_masked_loss(student.masked_patch_logits, teacher.ibot_probs, batch["masks_weight"],
                                          n_global_crops_total=batch["masks"].shape[0],
                                          student_temp=probe.config.student_temp)
        ours = {"teacher_dino_logits_swapped": raw.dino_logits, "teacher_dino_probs_swapped": teacher.dino_probs,
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

    # ------------------------------------------------------------------ the update on stored gradients
    def _stored_grad_update(self, fx: Mapping[str, Any], step: str, source: str, tol: Tolerances) -> list[Check]:
        run = StepRun.build(fx)
        for ours, official in official_name_map(run.model.student).items():
            sub, _, rest = ours.partition(".")
            run.model.student[sub].get_parameter(rest).grad = fx[f"{step}/grad/{official}"].clone()
        norms = run.update(schedule_values(fx, step))
        return (self._norms(norms, fx, step, "stored_grads", source, tol)
                + self._state_after(run.model, fx, step, source, tol, stored_grads=True))

    def _state_after(self, model: SSLMetaArch, fx: Mapping[str, Any], step: str, source: str, tol: Tolerances,
                     *, stored_grads: bool) -> list[Check]:
        tag = "stored_grads" if stored_grads else "chained"
        exact = tol.get("state_after_step_abs")
        chained = CHAINED_STATE_ABS * tol.scale
        bounds = {"student": exact if stored_grads else chained,
                  "teacher": exact if stored_grads else max(exact, chained * (1 - float(fx[f"{step}/momentum"])))}
        checks = []
        for tree, bound in bounds.items():
            state = official_named(getattr(model, tree))
            worst = max((check_abs(f"{source}:{tree}_after_{step}/{name}", state[name],
                                   fx[f"{tree}_after_{step}/{name}"], bound) for name in fx["student_param_names"]),
                        key=lambda c: c.error)
            note = f"worst tensor {worst.case.rsplit('/', 1)[-1]}" + (f"; {worst.note}" if worst.note else "")
            checks.append(Check(case=f"{source}:{tree}_after_{step}/{tag}", metric="abs", error=worst.error,
                                tolerance=bound, max_abs=worst.max_abs, note=note))
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
        run = StepRun.build(fx, drop_path_rate=rate, drop_path_uniform=uniform)
        return checks + self._step(run, fx, step_batch(fx, "step0"), prefix, source, tol, draws_prefix=prefix)
