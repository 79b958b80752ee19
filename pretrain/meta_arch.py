"""The DINOv2 self-distillation step: student, EMA teacher, DINO + iBOT + KoLeo, as the official code does it.

One call of :meth:`SSLMetaArch.forward_backward` with one micro-batch is one official
``SSLMetaArch.forward_backward``:

1. **Teacher** (no grad, eval mode): unmasked global crops -> CLS rows swapped to ``[crop 1; crop 0]`` and
   patch tokens gathered at ``mask_indices`` -> heads (shared head: one ``dino_head`` call on both).
2. **Teacher normalisation**: centring (one-step-deferred EMA centre) or Sinkhorn-Knopp, separately for the
   CLS logits and the patch logits.
3. **Student**: global crops *with* masks and local crops through the list path (efficient stochastic
   depth), then heads on local CLS, global CLS and masked patch tokens.
4. **Loss** ``dino_local + dino_global + koleo_w * sum_crop KoLeo + ibot`` and backward.

With several micro-batches (gradient accumulation) the teacher outputs of *all* of them are normalised
together (centre statistics and Sinkhorn-Knopp over the effective batch), then each micro-batch's loss is
back-propagated scaled by ``1 / n_micro``.

The teacher is a :class:`torch.nn.ModuleDict` like the student; by default an exact copy of it that the
training step updates by EMA (:func:`dinoforge.pretrain.optim.ema_update`), but any frozen teacher with the
same keys can be passed in (distillation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dinoforge.core.backbone import BackboneConfig, DinoVisionTransformer
from dinoforge.core.backbone.cnn_stem import load_mobilenet_stem
from dinoforge.core.backbone.heads import DINOHead, HeadConfig
from dinoforge.core.config import StrictModel
from dinoforge.core.errors import DataError
from dinoforge.core.pretrained_cnn import locate_weights, read_state_dict
from dinoforge.pretrain.losses import (
    IBOT_LOSS_SCALE,
    LOSS_SCALES,
    Centering,
    dino_global_loss,
    dino_local_loss,
    ibot_masked_loss,
    koleo_loss,
    sinkhorn_knopp,
    swap_global_crops,
)
from dinoforge.pretrain.losses.reduce import global_count
from dinoforge.pretrain.masking import Batch
from dinoforge.pretrain.optim import clip_grad_norms


class HeadShape(StrictModel):
    """Projection-head sizes (official defaults: K = 65536, 2048 hidden, 256 bottleneck, 3 layers)."""

    out_dim: int = Field(65536, gt=0, description="Number of prototypes K.")
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    nlayers: int = Field(3, ge=1)

    def head_config(self, in_dim: int) -> HeadConfig:
        """The core :class:`HeadConfig` for a backbone of width ``in_dim``."""
        return HeadConfig(in_dim=in_dim, **self.model_dump())


class MetaArchConfig(StrictModel):
    """Model side of the recipe (official defaults)."""

    backbone: BackboneConfig
    dino_head: HeadShape = Field(default_factory=HeadShape)
    ibot_head: HeadShape = Field(default_factory=HeadShape, description="Used only with ibot_separate_head.")
    ibot_separate_head: bool = False
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    sinkhorn_iterations: int = Field(3, ge=1)
    dino_loss_weight: float = Field(1.0, ge=0)
    ibot_loss_weight: float = Field(1.0, ge=0)
    koleo_loss_weight: float = Field(0.1, ge=0)
    koleo_first_crop_only: bool = Field(False, description="Paper variant; official applies KoLeo to both crops.")
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    stem_weights: str | None = Field(None, description="a torchvision MobileNetV2 state dict (path or "
                                     "pkg:MODULE/file) whose first blocks start a hybrid backbone's stem "
                                     "(backbone.mobilenet_stem_blocks); frozen unless stem_trainable")
    stem_trainable: bool = False

    @model_validator(mode="after")
    def _check_losses(self) -> MetaArchConfig:
        if self.dino_loss_weight == 0 and self.ibot_loss_weight == 0:
            raise ValueError("dino_loss_weight and ibot_loss_weight are both 0: nothing to train")
        if self.stem_weights and not self.backbone.mobilenet_stem_blocks:
            raise ValueError("stem_weights needs a hybrid backbone (backbone.mobilenet_stem_blocks > 0)")
        return self

    @property
    def ibot_out_dim(self) -> int:
        """K of the patch logits (the DINO head's K when the head is shared)."""
        return self.ibot_head.out_dim if self.ibot_separate_head else self.dino_head.out_dim


@dataclass
class TeacherOutput:
    """Teacher logits of one micro-batch and, once normalised, its target probabilities.

    Attributes:
        dino_logits: CLS logits ``[2B, K]`` in swapped order (teacher crop 1 rows first).
        ibot_logits: patch logits at ``mask_indices`` ``[M, K_ibot]`` (None without iBOT).
        dino_probs: normalised CLS targets ``[2, B, K]`` (``[0]`` from teacher crop 1).
        ibot_probs: normalised patch targets ``[M, K_ibot]``.
    """

    dino_logits: torch.Tensor
    ibot_logits: torch.Tensor | None
    dino_probs: torch.Tensor | None = None
    ibot_probs: torch.Tensor | None = None


@dataclass
class StudentOutput:
    """Student outputs of one micro-batch (natural crop order).

    Attributes:
        global_cls_tokens: post-norm pre-head CLS of the masked global crops ``[2B, D]`` (KoLeo input).
        global_cls_logits: ``[2B, K]``.
        local_cls_logits: ``[n_local * B, K]`` (``[0, K]`` without local crops).
        masked_patch_logits: ``[M, K_ibot]`` (None without iBOT).
    """

    global_cls_tokens: torch.Tensor
    global_cls_logits: torch.Tensor
    local_cls_logits: torch.Tensor
    masked_patch_logits: torch.Tensor | None


def build_student(config: MetaArchConfig, *, load_stem: bool = True) -> nn.ModuleDict:
    """Randomly initialised ``{"backbone", "dino_head"[, "ibot_head"]}`` (a hybrid backbone's stem loaded from
    ``config.stem_weights`` when set and ``load_stem``)."""
    backbone = DinoVisionTransformer(config.backbone)
    if config.stem_weights and load_stem and not backbone.pos_embed.is_meta:  # meta builds hold no data
        state = read_state_dict(locate_weights(config.stem_weights))
        load_mobilenet_stem(backbone.patch_embed.stem, state, trainable=config.stem_trainable,
                            what=f"model.stem_weights {config.stem_weights}")
    modules: dict[str, nn.Module] = {"backbone": backbone,
                                     "dino_head": DINOHead(config.dino_head.head_config(backbone.embed_dim))}
    if config.ibot_separate_head:
        modules["ibot_head"] = DINOHead(config.ibot_head.head_config(backbone.embed_dim))
    return nn.ModuleDict(modules)


def ema_teacher_from(student: nn.ModuleDict, config: MetaArchConfig) -> nn.ModuleDict:
    """An exact, frozen copy of ``student`` (the teacher backbone never uses stochastic depth)."""
    teacher_cfg = config.model_copy(update={"backbone": config.backbone.model_copy(update={"drop_path_rate": 0.0})})
    teacher = build_student(teacher_cfg, load_stem=False)  # the student's stem arrives with its state dict
    teacher.load_state_dict(student.state_dict())
    return teacher.requires_grad_(False)


class SSLMetaArch(nn.Module):
    """Student, teacher, teacher-normalisation state and the DINOv2 losses.

    Args:
        config: model side of the recipe.
        teacher: optional frozen teacher with the student's keys (default: an EMA copy of the student).
        student: optional existing student modules (default: built from ``config``); distillation passes its
            own (possibly DDP/FSDP-wrapped) modules to reuse the student pass and the losses.
    """

    def __init__(self, config: MetaArchConfig, *, teacher: nn.ModuleDict | None = None,
                 student: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.config = config
        self.do_dino = config.dino_loss_weight > 0
        self.do_ibot = config.ibot_loss_weight > 0
        self.do_koleo = config.koleo_loss_weight > 0
        self.student = student if student is not None else build_student(config)
        self.teacher = teacher.requires_grad_(False) if teacher is not None else ema_teacher_from(self.student, config)
        self.teacher.eval()
        self.dino_centering = Centering(config.dino_head.out_dim, shape_prefix=(1,),
                                        momentum=config.center_momentum, reduction="pooled")
        self.ibot_centering = Centering(config.ibot_out_dim, shape_prefix=(1, 1),
                                        momentum=config.center_momentum, reduction="mean_of_rank_means")

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Set the student's mode; the teacher always stays in eval mode (no drop path, as officially)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------ teacher
    def check_batch(self, batch: Batch) -> None:
        """Raise a :class:`DataError` naming what is wrong with a batch's layout (see :mod:`..masking`)."""
        missing = {"global_crops", "local_crops", "masks", "mask_indices", "masks_weight"} - set(batch)
        if missing:
            raise DataError(f"batch lacks {sorted(missing)}")
        rows, n_local_rows = batch["global_crops"].shape[0], batch["local_crops"].shape[0]
        patch = self.config.backbone.patch_size
        grid = (batch["global_crops"].shape[-2] // patch) * (batch["global_crops"].shape[-1] // patch)
        problems = []
        if rows == 0 or rows % 2:
            problems.append(f"global_crops has {rows} rows; expected 2 * images")
        elif n_local_rows % (rows // 2):
            problems.append(f"local_crops has {n_local_rows} rows, not a multiple of {rows // 2} images")
        if tuple(batch["masks"].shape) != (rows, grid):
            problems.append(f"masks is {list(batch['masks'].shape)}, expected [{rows}, {grid}]")
        if batch["mask_indices"].shape != batch["masks_weight"].shape:
            problems.append("mask_indices and masks_weight differ in length")
        if problems:
            raise DataError("bad batch: " + "; ".join(problems))

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> TeacherOutput:
        """Raw (un-normalised) teacher logits of one micro-batch."""
        self.check_batch(batch)
        out = self.teacher["backbone"].forward_dino(batch["global_crops"])
        cls = swap_global_crops(out["x_norm_clstoken"])  # [2B, D]
        if not self.do_ibot:
            return TeacherOutput(dino_logits=self.teacher["dino_head"](cls), ibot_logits=None)
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices"])  # [M, D]
        if self.config.ibot_separate_head:
            return TeacherOutput(dino_logits=self.teacher["dino_head"](cls),
                                 ibot_logits=self.teacher["ibot_head"](patches))
        logits = self.teacher["dino_head"](torch.cat([cls, patches]))  # [2B + M, K], one head call as officially
        return TeacherOutput(dino_logits=logits[: cls.shape[0]], ibot_logits=logits[cls.shape[0]:])

    @torch.no_grad()
    def normalize_teacher(self, outputs: Sequence[TeacherOutput], *, teacher_temp: float) -> list[TeacherOutput]:
        """Normalise the teacher logits of all micro-batches of a step together (and update the centres).

        Returns:
            The same outputs with ``dino_probs`` ``[2, B_i, K]`` and ``ibot_probs`` ``[M_i, K_ibot]`` set.
        """
        dino_all = torch.cat([o.dino_logits for o in outputs])  # [sum 2B_i, K]
        dino_probs = self._normalize(dino_all, teacher_temp, self.dino_centering, total=None)
        dino_split = dino_probs.split([o.dino_logits.shape[0] for o in outputs])
        results = [replace(o, dino_probs=p.reshape(2, -1, p.shape[-1])) for o, p in zip(outputs, dino_split, strict=True)]
        if not self.do_ibot:
            return results
        ibot_all = torch.cat([o.ibot_logits for o in outputs])  # [sum M_i, K_ibot]
        total = global_count(ibot_all.shape[0], ibot_all.device) if self.config.centering != "centering" else None
        ibot_probs = self._normalize(ibot_all, teacher_temp, self.ibot_centering, total=total)
        ibot_split = ibot_probs.split([o.ibot_logits.shape[0] for o in outputs])
        return [replace(r, ibot_probs=p) for r, p in zip(results, ibot_split, strict=True)]

    def _normalize(self, logits: torch.Tensor, teacher_temp: float, centering: Centering,
                   total: int | None) -> torch.Tensor:
        if self.config.centering == "centering":
            probs = centering.softmax(logits, teacher_temp)
            centering.update([logits])
            return probs
        return sinkhorn_knopp(logits, teacher_temp, n_iterations=self.config.sinkhorn_iterations,
                              total_samples=total)

    def get_teacher_output(self, batch: Batch, *, teacher_temp: float) -> TeacherOutput:
        """Normalised teacher output of a single batch (one official step; updates the centres)."""
        return self.normalize_teacher([self.teacher_logits(batch)], teacher_temp=teacher_temp)[0]

    # ------------------------------------------------------------------ student
    def get_student_output(self, batch: Batch) -> StudentOutput:
        """Student forward of one micro-batch (global crops masked, local crops not)."""
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        has_local = local_crops.shape[0] > 0
        crops = [global_crops, local_crops] if has_local else [global_crops]
        masks = [batch["masks"], None] if has_local else [batch["masks"]]
        outs = self.student["backbone"].forward_dino_list(crops, masks)
        global_cls = outs[0]["x_norm_clstoken"]  # [2B, D]
        local_cls = outs[1]["x_norm_clstoken"] if has_local else global_cls[:0]  # [n_local * B, D]
        head_inputs = [local_cls, global_cls]
        patches = None
        if self.do_ibot:
            patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices"])  # [M, D]
            if not self.config.ibot_separate_head:
                head_inputs.append(patches)
        logits = self.student["dino_head"](torch.cat(head_inputs)).split([x.shape[0] for x in head_inputs])
        masked_logits = None
        if self.do_ibot:
            masked_logits = self.student["ibot_head"](patches) if self.config.ibot_separate_head else logits[2]
        return StudentOutput(global_cls_tokens=global_cls, global_cls_logits=logits[1], local_cls_logits=logits[0],
                             masked_patch_logits=masked_logits)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, teacher_out: TeacherOutput, student_out: StudentOutput,
                       batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch.

        Returns:
            ``total`` (what is back-propagated) and the official logged values ``dino_local_crops_loss``,
            ``dino_global_crops_loss``, ``koleo_loss`` (total KoLeo term / number of crops it covers) and
            ``ibot_loss`` (half the iBOT term), each present when its loss is enabled.
        """
        cfg = self.config
        n_rows = batch["global_crops"].shape[0]  # 2B
        n_local = batch["local_crops"].shape[0] // (n_rows // 2)
        losses: dict[str, torch.Tensor] = {}
        total: torch.Tensor | float = 0.0
        if self.do_dino:
            if n_local > 0:
                losses["dino_local_crops_loss"] = dino_local_loss(
                    student_out.local_cls_logits, teacher_out.dino_probs, n_local_crops=n_local,
                    student_temp=cfg.student_temp)
                total = total + cfg.dino_loss_weight * losses["dino_local_crops_loss"]
            losses["dino_global_crops_loss"] = dino_global_loss(
                student_out.global_cls_logits, teacher_out.dino_probs, n_local_crops=n_local,
                student_temp=cfg.student_temp)
            total = total + cfg.dino_loss_weight * losses["dino_global_crops_loss"]
        if self.do_koleo:
            crops = student_out.global_cls_tokens.chunk(2)[: 1 if cfg.koleo_first_crop_only else 2]
            koleo_term = cfg.koleo_loss_weight * sum(koleo_loss(c) for c in crops)
            losses["koleo_loss"] = koleo_term / len(crops)
            total = total + koleo_term
        if self.do_ibot:
            ibot_term = ibot_masked_loss(student_out.masked_patch_logits, teacher_out.ibot_probs,
                                         batch["masks_weight"], n_global_crops_total=n_rows,
                                         student_temp=cfg.student_temp) * LOSS_SCALES * IBOT_LOSS_SCALE
            losses["ibot_loss"] = ibot_term / 2
            total = total + cfg.ibot_loss_weight * ibot_term
        losses["total"] = torch.as_tensor(total)
        return losses

    def forward_backward(self, micro_batches: Sequence[Batch], *, teacher_temp: float,
                         backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """Teacher, normalisation, student and backward for one optimizer step.

        Args:
            micro_batches: one batch (official step) or several (gradient accumulation, equal sizes).
            teacher_temp: teacher temperature of this iteration.
            backward: called with each micro-batch's scaled loss (default ``loss.backward()``; pass a
                grad-scaler's ``lambda l: scaler.scale(l).backward()`` for fp16).

        Returns:
            Loss values averaged over the micro-batches (see :meth:`compute_losses`).
        """
        if not micro_batches:
            raise ValueError("forward_backward needs at least one micro-batch")
        teacher_outs = self.normalize_teacher([self.teacher_logits(b) for b in micro_batches],
                                              teacher_temp=teacher_temp)
        scale = 1.0 / len(micro_batches)
        logged: dict[str, torch.Tensor] = {}
        for batch, teacher_out in zip(micro_batches, teacher_outs, strict=True):
            losses = self.compute_losses(teacher_out, self.get_student_output(batch), batch)
            loss = losses["total"] * scale
            (backward or torch.Tensor.backward)(loss)
            for key, value in losses.items():
                logged[key] = logged.get(key, 0.0) + value.detach() * scale
        return {key: float(value) for key, value in logged.items()}

    # ------------------------------------------------------------------ optimisation
    def clip_gradients(self, max_norm: float | None) -> dict[str, float]:
        """Clip each student sub-module's gradients separately; returns the norms before clipping."""
        return clip_grad_norms(self.student, max_norm)


class Centres(nn.Module):
    """The teacher-normalisation buffers of a meta-architecture: what a checkpoint stores as ``centres``."""

    def __init__(self, meta: nn.Module) -> None:
        super().__init__()
        self.dino_centering = meta.dino_centering
        self.ibot_centering = meta.ibot_centering
