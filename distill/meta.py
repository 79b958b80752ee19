"""The distillation step: one frozen-teacher pass per micro-batch, shared by every student.

:class:`DistillMeta` has the interface of :class:`~dinoforge.pretrain.meta_arch.SSLMetaArch` that the
training step drives (:class:`~dinoforge.pretrain.spec.StepModel`: ``forward_backward``, ``clip_gradients``;
``student`` / ``teacher`` module dicts; ``dino_centering`` / ``ibot_centering``), so the generic trainer, train
step, parallelisation and checkpoints run it unchanged. Its ``teacher`` dict is the **EMA of the students** (the pretraining machinery
updates and checkpoints the EMA under that name); the frozen model being distilled is :attr:`frozen`.

* **Head mode** (DINOv2 paper). Per micro-batch the frozen teacher runs once on the two global crops; its
  CLS tokens (crop-swapped) and its patch tokens (brought onto the students' grid, :mod:`.grid`) go through
  the frozen heads; the logits of all micro-batches of the step are normalised together (Sinkhorn-Knopp by
  default, or centring) exactly as in pretraining. Each student then runs the pretraining student pass and
  losses (``SSLMetaArch.get_student_output`` / ``compute_losses``: DINO on global and local crops, iBOT,
  KoLeo) against those shared targets. Without ``student_masking`` the student sees unmasked global crops
  and iBOT covers every patch token (weight ``1 / N`` per token, so each crop counts once).
* **Feature mode**. Per micro-batch the teacher runs once on the global (and local) crops; each student sees
  the very same crops and matches CLS and patch tokens through its adaptor (:mod:`.feature_loss`).

Students never interact: each one's loss is back-propagated on its own, so a run with several students
computes, for each of them, the gradients a run with that student alone computes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.core.errors import DataError
from dinoforge.distill.config import DistillConfig
from dinoforge.distill.feature_loss import feature_losses
from dinoforge.distill.grid import resample_tokens, token_grid
from dinoforge.distill.students import StudentSlot
from dinoforge.distill.teacher import FrozenTeacher
from dinoforge.pretrain.blocks import (
    Batch,
    Centering,
    SSLMetaArch,
    TeacherOutput,
    clip_grad_norms,
    collapse_indicators,
    mask_statistics,
    swap_global_crops,
)

Backward = Callable[[torch.Tensor], None]


class DistillMeta(nn.Module):
    """Frozen teacher, students and their EMA.

    Args:
        cfg: the recipe.
        teacher: the frozen teacher.
        slots: the students (see :func:`~dinoforge.distill.students.build_students`).
        modules: the flat ``{<student>_<part>: module}`` dict of all students.
    """

    def __init__(self, cfg: DistillConfig, teacher: FrozenTeacher, slots: Sequence[StudentSlot],
                 modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.mode, self.head_cfg, self.feature_cfg = cfg.mode, cfg.head, cfg.feature
        self.grid_resample = cfg.grid_resample
        self.slots = list(slots)
        self.student = nn.ModuleDict(modules)
        self.teacher = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()})
        self.frozen = teacher
        first = self.slots[0].meta_config
        k_dino = first.dino_head.out_dim if first is not None else 1
        k_ibot = first.ibot_out_dim if first is not None else 1
        momentum = cfg.head.center_momentum
        self.dino_centering = Centering(k_dino, shape_prefix=(1,), momentum=momentum, reduction="pooled")
        self.ibot_centering = Centering(k_ibot, shape_prefix=(1, 1), momentum=momentum,
                                        reduction="mean_of_rank_means")
        self._views: list[SSLMetaArch] | None = None
        self._last: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> DistillMeta:
        """Students follow ``mode``; the frozen teacher and the EMA always stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        self.frozen.eval()
        return self

    @property
    def teacher_forwards(self) -> int:
        """Frozen-teacher backbone passes so far (one per crop group and micro-batch)."""
        return self.frozen.forward_passes

    # ------------------------------------------------------------------ step
    def forward_backward(self, micro_batches: Sequence[Batch], *, teacher_temp: float,
                         backward: Backward | None = None) -> dict[str, float]:
        """Teacher once per micro-batch, then every student's loss and backward.

        Args:
            micro_batches: this rank's micro-batches of the step (pretraining batch layout).
            teacher_temp: teacher temperature (head mode).
            backward: called with each student's scaled loss (default ``loss.backward()``).

        Returns:
            ``<student>/<term>`` values averaged over micro-batches, and ``total`` (sum over students).
        """
        if not micro_batches:
            raise ValueError("forward_backward needs at least one micro-batch")
        backward = backward or torch.Tensor.backward
        if self.mode == "head":
            logged = self._head_step(micro_batches, teacher_temp, backward)
        else:
            logged = self._feature_step(micro_batches, backward)
        out = {key: float(value) for key, value in logged.items()}
        out["total"] = sum(out[f"{slot.name}/total"] for slot in self.slots)
        return out

    def clip_gradients(self, max_norm: float | None) -> dict[str, float]:
        """Clip each student sub-module on its own (pretraining rule); norms before clipping."""
        return clip_grad_norms(self.student, max_norm)

    # ------------------------------------------------------------------ head mode
    def _student_views(self) -> list[SSLMetaArch]:
        """One pretraining meta-architecture per student over *our* (possibly wrapped) modules.

        Built on first use, i.e. after DDP/FSDP wrapping, so the student passes go through the wrappers.
        The views share this module's centres and the frozen teacher; they are not registered as children.
        """
        if self._views is None:
            views = []
            for slot in self.slots:
                parts = nn.ModuleDict({part: self.student[key] for part, key in slot.keys.items()})
                view = SSLMetaArch(slot.meta_config, student=parts, teacher=self.frozen.parts)
                view.dino_centering, view.ibot_centering = self.dino_centering, self.ibot_centering
                views.append(view)
            self._views = views
        return self._views

    def _loss_batch(self, batch: Batch) -> Batch:
        """Without student masking: unmasked global crops and every patch token selected for iBOT."""
        if "masks" not in batch or "global_crops" not in batch:
            raise DataError("bad batch: it needs global_crops and masks (pretraining batch layout)")
        if self.head_cfg.student_masking:
            return batch
        every = torch.ones_like(batch["masks"], dtype=torch.bool)  # [2B, N]
        stats = mask_statistics(every)
        return {**batch, **stats, "masks": torch.zeros_like(every)}

    def _teacher_patches(self, patches: torch.Tensor, image_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
        """Teacher patch tokens ``[n, N_t, D]`` on the grid of a student with ``patch_size``."""
        src = token_grid(image_hw, self.frozen.config.patch_size)
        return resample_tokens(patches, src, token_grid(image_hw, patch_size), self.grid_resample)

    @torch.no_grad()
    def _teacher_logits(self, view: SSLMetaArch, batch: Batch) -> TeacherOutput:
        """Raw teacher logits of one micro-batch (the pretraining ``teacher_logits`` plus grid resampling)."""
        view.check_batch(batch)
        crops = batch["global_crops"]
        feats = self.frozen.features([crops])[0]
        cls = swap_global_crops(feats["x_norm_clstoken"])  # [2B, D_t]
        self._last["teacher_cls"] = cls
        if not view.do_ibot:
            return TeacherOutput(dino_logits=self.frozen.head("dino_head", cls), ibot_logits=None)
        patches = self._teacher_patches(feats["x_norm_patchtokens"], tuple(crops.shape[-2:]),
                                        view.config.backbone.patch_size)  # [2B, N_s, D_t]
        patches = patches.flatten(0, 1).index_select(0, batch["mask_indices"])  # [M, D_t]
        if "ibot_head" in self.frozen.head_names:
            return TeacherOutput(dino_logits=self.frozen.head("dino_head", cls),
                                 ibot_logits=self.frozen.head("ibot_head", patches))
        logits = self.frozen.head("dino_head", torch.cat([cls, patches]))  # [2B + M, K], one call as officially
        return TeacherOutput(dino_logits=logits[: cls.shape[0]], ibot_logits=logits[cls.shape[0]:])

    def _head_step(self, micro_batches: Sequence[Batch], teacher_temp: float,
                   backward: Backward) -> dict[str, torch.Tensor]:
        views = self._student_views()
        batches = [self._loss_batch(b) for b in micro_batches]
        raw = [self._teacher_logits(views[0], b) for b in batches]
        self._last["teacher_logits"] = raw[-1].dino_logits
        targets = views[0].normalize_teacher(raw, teacher_temp=teacher_temp)  # all micro-batches together
        scale = 1.0 / len(batches)
        logged: dict[str, torch.Tensor] = {}
        for batch, target in zip(batches, targets, strict=True):
            for slot, view in zip(self.slots, views, strict=True):
                student_out = view.get_student_output(batch)
                losses = view.compute_losses(target, student_out, batch)
                backward(losses["total"] * scale)
                self._last[f"{slot.name}/cls"] = student_out.global_cls_tokens.detach()
                _accumulate(logged, slot.name, losses, scale)
        return logged

    # ------------------------------------------------------------------ feature mode
    def _crop_groups(self, batch: Batch) -> list[torch.Tensor]:
        if "global_crops" not in batch:
            raise DataError("bad batch: it needs global_crops (pretraining batch layout)")
        local = batch.get("local_crops")
        use_local = self.feature_cfg.local_crops and local is not None and local.shape[0] > 0
        groups = [batch["global_crops"], local] if use_local else [batch["global_crops"]]
        if self.feature_cfg.mixup > 0:
            step = int(batch.get("data_step", 0))
            groups = [mix_views(g, self.feature_cfg.mixup, seed=step * 16 + i) for i, g in enumerate(groups)]
        return groups

    def _feature_losses(self, slot: StudentSlot, crops: list[torch.Tensor],
                        teacher_feats: list[dict]) -> dict[str, torch.Tensor]:
        backbone = self.student[slot.keys["backbone"]]
        feats = backbone.forward_dino_list(crops, [None] * len(crops))
        s_cls = torch.cat([f["x_norm_clstoken"] for f in feats])  # [n_crops, D_s]
        s_patch = torch.cat([f["x_norm_patchtokens"].flatten(0, 1) for f in feats])  # [n_tokens, D_s]
        t_cls = torch.cat([f["x_norm_clstoken"] for f in teacher_feats])  # [n_crops, D_t]
        t_patch = torch.cat([
            self._teacher_patches(f["x_norm_patchtokens"], tuple(c.shape[-2:]), slot.backbone.patch_size).flatten(0, 1)
            for f, c in zip(teacher_feats, crops, strict=True)])  # [n_tokens, D_t]
        self._last[f"{slot.name}/cls"] = feats[0]["x_norm_clstoken"].detach()
        if "adaptor" in slot.keys:
            s_cls, s_patch = self.student[slot.keys["adaptor"]](s_cls, s_patch)
        return feature_losses(self.feature_cfg, s_cls, t_cls, s_patch, t_patch)

    def _feature_step(self, micro_batches: Sequence[Batch], backward: Backward) -> dict[str, torch.Tensor]:
        scale = 1.0 / len(micro_batches)
        logged: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            crops = self._crop_groups(batch)
            teacher_feats = self.frozen.features(crops)  # one pass for every student
            self._last["teacher_cls"] = teacher_feats[0]["x_norm_clstoken"]
            for slot in self.slots:
                losses = self._feature_losses(slot, crops, teacher_feats)
                backward(losses["total"] * scale)
                _accumulate(logged, slot.name, losses, scale)
        return logged

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def indicators(self, *, teacher_temp: float) -> dict[str, float]:
        """Health of the last step, from tensors it already computed (no extra teacher pass).

        Returns:
            ``<student>/feature_std`` (spread of the student's L2-normalised global CLS tokens, ~1 healthy,
            0 collapsed), ``teacher_forwards`` and, in head mode, the teacher's ``teacher_entropy`` /
            ``teacher_batch_entropy`` at this temperature (see :mod:`dinoforge.pretrain.monitor`).
        """
        out: dict[str, float] = {"teacher_forwards": float(self.teacher_forwards)}
        for slot in self.slots:
            cls = self._last.get(f"{slot.name}/cls")
            if cls is not None and len(cls) > 1:
                feats = F.normalize(cls.float(), dim=-1)
                out[f"{slot.name}/feature_std"] = float(feats.std(0, unbiased=False).mean() * math.sqrt(cls.shape[-1]))
        if self.mode == "head" and "teacher_logits" in self._last:
            center = self.dino_centering.center if self.head_cfg.centering == "centering" else None
            ind = collapse_indicators(self._last["teacher_logits"], self._last["teacher_cls"],
                                      teacher_temp=teacher_temp, center=center)
            out.update({k: v for k, v in ind.items() if k.startswith("teacher") or k == "center_norm"})
        return out


def _accumulate(logged: dict[str, torch.Tensor], name: str, losses: dict[str, torch.Tensor], scale: float) -> None:
    for key, value in losses.items():
        full = f"{name}/{key}"
        logged[full] = logged.get(full, 0.0) + value.detach() * scale


def mix_views(crops: torch.Tensor, probability: float, *, seed: int) -> torch.Tensor:
    """Blend some crops with another crop of the same group (function matching's mixup).

    The teacher is queried on the blend too, so its targets stay exact: the student learns the teacher's
    function between images, not only at the few thousand real ones a small data set has. Deterministic in
    ``seed`` (the data step), so a resumed run draws the same blends.

    Args:
        crops: ``[N, 3, H, W]`` normalised views.
        probability: share of crops that are blended.
        seed: random stream of this group at this step.

    Returns:
        ``[N, 3, H, W]``: ``w * x_i + (1 - w) * x_perm(i)`` with ``w ~ U(0, 1)`` where blended, else ``x_i``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = crops.shape[0]
    partner = torch.randperm(n, generator=gen)  # [N]
    weight = torch.rand(n, generator=gen)  # [N]
    weight = torch.where(torch.rand(n, generator=gen) < probability, weight, torch.ones(n))
    weight = weight.view(n, 1, 1, 1).to(crops.dtype)
    return crops * weight + crops[partner] * (1 - weight)
