"""The distillation run: a :class:`~dinoforge.pretrain.spec.TrainSpec` that the generic trainer drives.

:class:`DistillSpec` plugs a frozen teacher and its students into the generic
:class:`~dinoforge.pretrain.trainer.Trainer`, so the loop, the train step (schedules, AdamW with the official
parameter groups, per-sub-module clipping, loss-spike policy, bf16/fp16, gradient accumulation, EMA),
never-lose-a-run checkpoints with bit-exact resume, SIGTERM handling, metrics, progress bar and periodic k-NN
all run as in pretraining. The spec provides what is model-specific:

* ``build``: frozen teacher + students + their EMA (:class:`~dinoforge.distill.meta.DistillMeta`),
  activation checkpointing / compile per student, data parallelism, the pretraining batches;
* ``check_resume``: a resumed run must have the same teacher (file hash), students and losses;
* ``indicators`` / ``collapse_warning``: per-student health;
* ``evaluate`` / ``export``: k-NN and one artifact per student EMA, with the teacher's k-NN as reference.

Pretraining is used only through :mod:`dinoforge.pretrain.spec`, :mod:`dinoforge.pretrain.blocks` and
:mod:`dinoforge.pretrain.trainer`.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (``student`` = the students, ``teacher``
= their EMA, as in pretraining checkpoints), ``artifacts/<student>/``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinoforge.core.config import config_to_yaml
from dinoforge.core.errors import ConfigError
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.core.runtime import Runtime, seed_everything
from dinoforge.distill.config import DistillConfig
from dinoforge.distill.export import ARTIFACTS_DIR, gather_students, student_metrics, write_student_artifact
from dinoforge.distill.meta import DistillMeta
from dinoforge.distill.students import build_students
from dinoforge.distill.teacher import crop_views, load_teacher, require_heads
from dinoforge.pretrain.blocks import (
    BatchLayout,
    Centres,
    KnnMonitor,
    MaskingGenerator,
    ParallelConfig,
    PlainTeacher,
    PretrainBatches,
    default_preprocess,
    official_max_num_patches,
    open_pretrain_source,
    parallelize,
)
from dinoforge.pretrain.spec import Precision, RunParts, check_unchanged, knn_enabled
from dinoforge.pretrain.trainer import Trainer

log = logging.getLogger("dinoforge.distill")
_IMMUTABLE_ON_RESUME = ("mode", "teacher", "students", "head", "feature", "grid_resample", "crops", "masking")


class DistillSpec:
    """A distillation run of a :class:`DistillConfig` (see the module docstring).

    Args:
        cfg: the resolved recipe.
    """

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.knn: KnnMonitor | None = None
        self._teacher_knn: dict[bool, dict[str, float]] = {}

    # ------------------------------------------------------------------ construction
    def build(self, runtime: Runtime) -> RunParts:
        """Teacher, students (each under its own seed), their EMA, parallelism and the batches."""
        cfg = self.cfg
        self.rt = runtime
        self.source = open_pretrain_source(cfg.data.source)
        teacher, self.teacher_info = load_teacher(cfg.teacher, crop_views(cfg))
        if cfg.mode == "head":
            require_heads(teacher, self.teacher_info)
        self.slots, modules = build_students(cfg, teacher)
        seed_everything(cfg.seed)  # the RNG state after building does not depend on the students
        self.meta = DistillMeta(cfg, teacher, self.slots, modules).to(runtime.device)
        par = parallelize(self.meta, self._accelerate(), world_size=runtime.world_size, device=runtime.device)
        self.ema = par.raw_teacher
        batches = self._batches()
        self.preprocess = {slot.name: self._preprocess(slot.backbone.patch_size) for slot in self.slots}
        if runtime.is_main and knn_enabled(cfg.knn):
            self.knn = KnnMonitor(cfg.knn, self.preprocess[self.slots[0].name], device=str(runtime.device))
        log.info("distill (%s mode): teacher %s (%s, %s parameters) -> students %s", cfg.mode,
                 self.teacher_info.path, self.teacher_info.kind, f"{self.teacher_info.num_parameters:,}",
                 ", ".join(f"{s.name} ({_count(par.raw_student, s.keys['backbone']):,})" for s in self.slots))
        return RunParts(model=self.meta, student=par.raw_student, teacher=par.raw_teacher, state=Centres(self.meta),
                        batches=batches, extra={"teacher_sha256": self.teacher_info.sha256})

    def _accelerate(self) -> ParallelConfig:
        """Activation checkpointing and ``torch.compile`` for every student backbone (and the frozen teacher).

        ``parallelize`` applies them to the one ``backbone`` key of a pretraining model; here they are applied
        first, in the same order (checkpointing, then compile, then data parallelism), to each student.

        Returns:
            The parallel config left for ``parallelize`` (data parallelism only).
        """
        cfg = self.cfg.parallel
        backbones = [self.meta.student[slot.keys["backbone"]] for slot in self.slots]
        for backbone in backbones if cfg.activation_checkpointing else []:
            backbone.set_grad_checkpointing(True)
        for backbone in [*backbones, self.meta.frozen.backbone] if cfg.compile else []:
            for block in backbone.blocks:
                block.forward_list = torch.compile(block.forward_list)
        if cfg.activation_checkpointing or cfg.compile:
            log.info("students: activation_checkpointing=%s compile=%s", cfg.activation_checkpointing, cfg.compile)
        return cfg.model_copy(update={"activation_checkpointing": False, "compile": False})

    def _batches(self) -> PretrainBatches:
        """Pretraining batches; masks are drawn only when students are masked, local crops only when used."""
        cfg = self.cfg
        patch = self.slots[0].backbone.patch_size
        crops = cfg.crops
        if cfg.mode == "feature" and not cfg.feature.local_crops:
            crops = crops.model_copy(update={"local_crops_number": 0})
        masked = cfg.mode == "head" and cfg.head.student_masking
        generator = MaskingGenerator(crops.global_crops_size // patch,
                                     max_num_patches=official_max_num_patches(crops.global_crops_size, patch),
                                     min_num_patches=cfg.masking.min_num_patches, min_aspect=cfg.masking.min_aspect)
        layout = BatchLayout(micro_batch=cfg.data.batch_size, accum=cfg.data.grad_accum,
                             world_size=self.rt.world_size, rank=self.rt.rank)
        return PretrainBatches(self.source, crops, layout, mask_generator=generator,
                               mask_ratio=cfg.masking.mask_ratio_min_max,
                               mask_probability=cfg.masking.mask_sample_probability if masked else 0.0, seed=cfg.seed)

    def _preprocess(self, patch_size: int) -> PreprocessConfig:
        """Evaluation contract of a student: the recipe's, or resize to the global crop size."""
        crops = self.cfg.crops
        if self.cfg.artifact.preprocess is not None:
            return self.cfg.artifact.preprocess.model_copy(update={"patch_size": patch_size})
        return default_preprocess(crops.global_crops_size, patch_size, crops.mean, crops.std)

    # ------------------------------------------------------------------ resume
    def check_resume(self, saved_config: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """Same kind of run, teacher file, students, losses, crops and masking as the checkpoints."""
        if "students" not in saved_config:
            raise ConfigError(f"cannot resume {self.cfg.run_dir}: it holds a pretraining run, not a distillation run")
        check_unchanged(saved_config, self.cfg.model_dump(mode="json"), _IMMUTABLE_ON_RESUME,
                        run_dir=self.cfg.run_dir)
        saved = state.get("progress", {}).get("extra", {}).get("teacher_sha256")
        if saved is not None and saved != self.teacher_info.sha256:
            raise ConfigError(f"cannot resume {self.cfg.run_dir}: the teacher {self.teacher_info.path} changed since "
                              f"its checkpoints were written (sha256 {saved[:12]}... -> "
                              f"{self.teacher_info.sha256[:12]}...)")

    # ------------------------------------------------------------------ monitoring and export
    def indicators(self, batch: dict, values: Mapping[str, float], precision: Precision) -> dict[str, float]:
        """Per-student feature spread and the teacher's entropy, from the tensors of the last step."""
        return self.meta.indicators(teacher_temp=values["teacher_temp"])

    def collapse_warning(self, record: Mapping[str, Any]) -> str | None:
        """Students whose L2-normalised CLS features collapsed."""
        floor = self.cfg.monitor.collapse_min_feature_std
        collapsed = [s.name for s in self.slots if record.get(f"{s.name}/feature_std", 1.0) < floor]
        return f"student CLS features collapsed (feature_std < {floor}): {collapsed}" if collapsed else None

    def _teacher_reference(self, knn: KnnMonitor, periodic: bool) -> dict[str, float]:
        """k-NN of the frozen teacher (once per set of images), with the students' evaluation contract."""
        if periodic not in self._teacher_knn:
            backbone = copy.deepcopy(self.meta.frozen.backbone).float().eval()
            knn.preprocess = self._preprocess(backbone.config.patch_size)
            result = knn.evaluate(PlainTeacher(backbone, {}), periodic=periodic)
            self._teacher_knn[periodic] = {f"teacher/{k}": v for k, v in result.items()}
        return self._teacher_knn[periodic]

    def evaluate(self, step: int, *, periodic: bool) -> dict[str, float] | None:
        """k-NN of every student EMA (``<student>/knn_*``), its ratio to the teacher's (``knn_teacher``)."""
        students = gather_students(self.ema, self.slots, is_main=self.rt.is_main)
        if students is None or self.knn is None:
            return None
        out = dict(self._teacher_reference(self.knn, periodic)) if self.cfg.knn_teacher else {}
        for name, model in students.items():
            self.knn.preprocess = self.preprocess[name]
            result = self.knn.evaluate(model, periodic=periodic)
            out.update({f"{name}/{k}": v for k, v in result.items()})
            if "teacher/knn_top1" in out and out["teacher/knn_top1"] > 0:
                out[f"{name}/knn_ratio"] = result["knn_top1"] / out["teacher/knn_top1"]
        return out

    def export(self, step: int, last: Mapping[str, Any]) -> Path | None:
        """One artifact per student EMA under ``RUN_DIR/artifacts/<student>``; returns that root."""
        students = gather_students(self.ema, self.slots, is_main=self.rt.is_main)
        if students is None:
            return None
        run_dir = Path(self.cfg.run_dir)
        root = run_dir / ARTIFACTS_DIR
        base = self.cfg.artifact.name or f"dinoforge-distill-{run_dir.name}"
        details = {"step": step, "data": self.cfg.data.source, "run_dir": str(run_dir),
                   "world_size": self.rt.world_size}
        poolings = {student.name: student.pooling for student in self.cfg.students}
        for slot in self.slots:
            path = write_student_artifact(
                root / slot.name, students[slot.name], name=f"{base}-{slot.name}", slot=slot,
                teacher=self.teacher_info, preprocess=self.preprocess[slot.name], recipe=config_to_yaml(self.cfg),
                mode=self.cfg.mode, data_sha256=self.source.fingerprint, metrics=student_metrics(dict(last), slot.name),
                details=details, include_heads=self.cfg.artifact.include_heads, pooling=poolings[slot.name])
            log.info("student %s: artifact written to %s (step %d)", slot.name, path, step)
        return root


def distill_trainer(cfg: DistillConfig, runtime: Runtime | None = None) -> Trainer:
    """The trainer of a distillation run: ``distill_trainer(cfg).run()`` is ``dinoforge distill``."""
    return Trainer(DistillSpec(cfg), runtime)


def _count(modules: Any, key: str) -> int:
    return sum(p.numel() for p in modules[key].parameters())
