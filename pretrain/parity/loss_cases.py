"""Parity of the losses and teacher normalisation: ``koleo``, ``dino_loss_*`` and ``ibot_loss_*`` fixtures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dinoforge.core.parity import Check, Tolerances, check_abs, check_exact, check_maxnorm, check_rel
from dinoforge.pretrain.losses import (
    IBOT_LOSS_SCALE,
    LOSS_SCALES,
    Centering,
    dino_global_loss,
    dino_local_loss,
    ibot_masked_loss,
    koleo_loss,
    n_loss_terms,
    sinkhorn_knopp,
    swap_global_crops,
)
from dinoforge.pretrain.losses.reduce import global_count
from dinoforge.pretrain.masking import mask_statistics
from dinoforge.pretrain.parity.base import GuardedHandler


class KoleoHandler(GuardedHandler):
    """``KoLeoLoss`` on one tensor: loss, gradient, nearest neighbours, and the duplicate-rows case."""

    name = "koleo"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"features", "grad_features", "nn_index", "loss"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        eps = float(fixture.get("eps", 1e-8))
        features = fixture["features"].clone().requires_grad_(True)
        loss, index = koleo_loss(features, eps, return_index=True)
        loss.backward()
        checks = [check_rel(f"{source}:loss", loss.detach(), fixture["loss"], tol.get("loss_rel")),
                  check_maxnorm(f"{source}:grad_features", features.grad, fixture["grad_features"],
                                tol.get("grad_maxnorm")),
                  check_exact(f"{source}:nn_index", index, fixture["nn_index"])]
        if "dup_features" in fixture:
            with torch.no_grad():
                dup_loss, dup_index = koleo_loss(fixture["dup_features"], eps, return_index=True)
            checks += [check_rel(f"{source}:dup_loss", dup_loss, fixture["dup_loss"], tol.get("loss_rel")),
                       check_exact(f"{source}:dup_nn_index", dup_index, fixture["dup_nn_index"])]
        return checks


def _steps(fixture: Mapping[str, Any]) -> range:
    return range(int(fixture.get("num_steps", 1)))


def _is_centering(fixture: Mapping[str, Any]) -> bool:
    return str(fixture["mode"]) == "centering"


class DinoLossHandler(GuardedHandler):
    """``DINOLoss`` sequences: teacher normalisation (centre carried over), both loss terms, gradients."""

    name = "dino_loss"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"mode", "step0/teacher_logits", "step0/student_logits_global"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        k = int(fixture["K"])
        n_local = int(fixture["n_local_crops"])
        checks = [check_exact(f"{source}:n_loss_terms", n_loss_terms(n_local), int(fixture["n_loss_terms"]))]
        centering = Centering(k, shape_prefix=(1,), momentum=float(fixture["center_momentum"]))
        if "center_initial" in fixture:
            checks.append(check_abs(f"{source}:center_initial", centering.center, fixture["center_initial"],
                                    tol.get("probs_abs")))
        for s in _steps(fixture):
            checks += self._step(fixture, f"step{s}", centering, n_local, source, tol)
        return checks

    def _step(self, fx: Mapping[str, Any], step: str, centering: Centering, n_local: int, source: str,
              tol: Tolerances) -> list[Check]:
        temp, student_temp = float(fx[f"{step}/teacher_temp"]), float(fx["student_temp"])
        swapped = swap_global_crops(fx[f"{step}/teacher_logits"])  # [2B, K]
        checks: list[Check] = []
        if _is_centering(fx):
            checks.append(check_abs(f"{source}:{step}/center_used", centering.center, fx[f"{step}/center_used"],
                                    tol.get("probs_abs")))
            probs = centering.softmax(swapped, temp)
            centering.update([swapped])
            checks.append(check_abs(f"{source}:{step}/center_next", centering.center, fx[f"{step}/center_next"],
                                    tol.get("probs_abs")))
        else:
            probs = sinkhorn_knopp(swapped, temp)
        probs = probs.view(2, -1, probs.shape[-1])  # [2, B, K]
        checks.append(check_abs(f"{source}:{step}/teacher_probs_swapped", probs, fx[f"{step}/teacher_probs_swapped"],
                                tol.get("probs_abs")))
        s_global = fx[f"{step}/student_logits_global"].clone().requires_grad_(True)
        s_local = fx[f"{step}/student_logits_local"].clone().requires_grad_(True)
        global_loss = dino_global_loss(s_global, probs, n_local_crops=n_local, student_temp=student_temp)
        local_loss = (dino_local_loss(s_local, probs, n_local_crops=n_local, student_temp=student_temp)
                      if n_local > 0 else s_local.sum() * 0)
        (local_loss + global_loss).backward()
        pairs = [("dino_local_crops_loss", local_loss), ("dino_global_crops_loss", global_loss)]
        checks += [check_rel(f"{source}:{step}/{key}", ours.detach(), fx[f"{step}/{key}"], tol.get("loss_rel"))
                   for key, ours in pairs if f"{step}/{key}" in fx]
        for key, tensor in (("grad_student_logits_global", s_global), ("grad_student_logits_local", s_local)):
            if f"{step}/{key}" in fx:
                checks.append(check_maxnorm(f"{source}:{step}/{key}", tensor.grad, fx[f"{step}/{key}"],
                                            tol.get("grad_maxnorm")))
        return checks


class IbotLossHandler(GuardedHandler):
    """``iBOTPatchLoss`` sequences: mask bookkeeping, normalisation, ``forward_masked``, gradients."""

    name = "ibot_loss"

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        return {"mode", "step0/teacher_logits_masked", "step0/student_logits_masked"} <= fixture.keys()

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        checks = [check_exact(f"{source}:loss_scales", LOSS_SCALES, float(fixture.get("loss_scales", 2.0))),
                  check_exact(f"{source}:ibot_loss_scale", IBOT_LOSS_SCALE, float(fixture.get("ibot_loss_scale", 0.5)))]
        centering = Centering(int(fixture["K"]), shape_prefix=(1, 1), momentum=float(fixture["center_momentum"]),
                              reduction="mean_of_rank_means")
        if "center_initial" in fixture:
            checks.append(check_abs(f"{source}:center_initial", centering.center, fixture["center_initial"],
                                    tol.get("probs_abs")))
        for s in _steps(fixture):
            checks += self._step(fixture, f"step{s}", centering, source, tol)
        return checks

    def _step(self, fx: Mapping[str, Any], step: str, centering: Centering, source: str,
              tol: Tolerances) -> list[Check]:
        masks = fx[f"{step}/masks"]
        stats = mask_statistics(masks)
        checks = [check_exact(f"{source}:{step}/mask_indices", stats["mask_indices"], fx[f"{step}/mask_indices"]),
                  check_abs(f"{source}:{step}/masks_weight", stats["masks_weight"], fx[f"{step}/masks_weight"], 0.0),
                  check_exact(f"{source}:{step}/n_masked_patches", stats["n_masked_patches"],
                              int(fx[f"{step}/n_masked_patches"]))]
        temp = float(fx[f"{step}/teacher_temp"])
        teacher = fx[f"{step}/teacher_logits_masked"]  # [M, K]
        if _is_centering(fx):
            checks.append(check_abs(f"{source}:{step}/center_used", centering.center, fx[f"{step}/center_used"],
                                    tol.get("probs_abs")))
            probs = centering.softmax(teacher, temp)
            centering.update([teacher])
            checks.append(check_abs(f"{source}:{step}/center_next", centering.center, fx[f"{step}/center_next"],
                                    tol.get("probs_abs")))
        else:
            total = global_count(teacher.shape[0])
            if f"{step}/sinkhorn_B_after_all_reduce" in fx:
                checks.append(check_exact(f"{source}:{step}/sinkhorn_B_after_all_reduce", total,
                                          int(fx[f"{step}/sinkhorn_B_after_all_reduce"])))
            probs = sinkhorn_knopp(teacher, temp, total_samples=total)
        checks.append(check_abs(f"{source}:{step}/teacher_probs", probs, fx[f"{step}/teacher_probs"],
                                tol.get("probs_abs")))
        student = fx[f"{step}/student_logits_masked"].clone().requires_grad_(True)
        value = ibot_masked_loss(student, probs, stats["masks_weight"], n_global_crops_total=masks.shape[0],
                                 student_temp=float(fx["student_temp"]))
        term = value * LOSS_SCALES * IBOT_LOSS_SCALE
        term.backward()
        for key, ours in (("forward_masked_value", value), ("ibot_loss", term), ("ibot_loss_logged", term / 2)):
            checks.append(check_rel(f"{source}:{step}/{key}", ours.detach(), fx[f"{step}/{key}"], tol.get("loss_rel")))
        checks.append(check_maxnorm(f"{source}:{step}/grad_student_logits_masked", student.grad,
                                    fx[f"{step}/grad_student_logits_masked"], tol.get("grad_maxnorm")))
        return checks
