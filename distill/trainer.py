"""The distillation run: the pretraining :class:`~dinoforge.pretrain.trainer.Trainer` driving a frozen teacher.

:class:`DistillTrainer` *is* the pretraining trainer: the loop, the train step (schedules, AdamW with the
official parameter groups, per-sub-module clipping, loss-spike policy, bf16/fp16, gradient accumulation,
EMA), data (deterministic multi-crop batches), ``parallelize`` (DDP / FSDP2), never-lose-a-run checkpoints
with bit-exact resume, SIGTERM handling, metrics, progress bar and periodic k-NN all run unchanged. It only
replaces what is model-specific:

* ``_build``: frozen teacher + students + their EMA (:class:`~dinoforge.distill.meta.DistillMeta`) instead
  of an ``SSLMetaArch``;
* ``_log``: per-student losses and health indicators;
* ``_knn_record`` / ``_export``: k-NN and one artifact per student EMA, with the teacher k-NN as reference;
* ``_check_compatible`` / ``_restore``: a resumed run must have the same teacher (file hash), students and
  losses.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (``student`` = the students, ``teacher``
= their EMA, as in pretraining checkpoints), ``artifacts/<student>/``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from dinoforge.core.errors import ConfigError
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.distill.config import DistillConfig
from dinoforge.distill.export import ARTIFACTS_DIR, gather_students, student_metrics, write_student_artifact
from dinoforge.distill.meta import DistillMeta
from dinoforge.distill.students import build_students
from dinoforge.distill.teacher import load_teacher, require_heads
from dinoforge.pretrain.data import BatchLayout, PretrainBatches
from dinoforge.pretrain.masking import MaskingGenerator, official_max_num_patches
from dinoforge.pretrain.monitor import MetricsLog
from dinoforge.pretrain.parallelize import ParallelConfig, parallelize
from dinoforge.pretrain.runtime import Runtime, seed_everything
from dinoforge.pretrain.sources import open_pretrain_source
from dinoforge.pretrain.teacher_export import PlainTeacher, default_preprocess
from dinoforge.pretrain.train_loop import StepResult
from dinoforge.pretrain.trainer import Trainer

log = logging.getLogger("dinoforge.distill")
_IMMUTABLE_ON_RESUME = ("mode", "teacher", "students", "head", "feature", "grid_resample")


class DistillTrainer(Trainer):
    """Builds a distillation run from a :class:`DistillConfig` and runs it with the pretraining machinery.

    Args:
        cfg: the resolved recipe.
        runtime: where this process runs (default: from the environment; joins torchrun's group).
    """

    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, runtime)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.source = open_pretrain_source(cfg.data.source)
        teacher, self.teacher_info = load_teacher(cfg.teacher)
        if cfg.mode == "head":
            require_heads(teacher, self.teacher_info)
        self.slots, modules = build_students(cfg, teacher)
        seed_everything(cfg.seed)  # the RNG state after building does not depend on the students
        self.meta = DistillMeta(cfg, teacher, self.slots, modules).to(rt.device)
        self.par = parallelize(self.meta, self._accelerate(), world_size=rt.world_size, device=rt.device)
        self._build_optimization()
        self.batches = self._batches()
        self.preprocess = {slot.name: self._preprocess(slot.backbone.patch_size) for slot in self.slots}
        self.progress.extra["teacher_sha256"] = self.teacher_info.sha256
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.monitor.tensorboard) if rt.is_main else None
        self.knn, self._teacher_knn = None, {}
        if rt.is_main and (cfg.knn.every_steps or cfg.knn.at_end or cfg.knn.at_start):
            from dinoforge.pretrain.knn_monitor import KnnMonitor

            self.knn = KnnMonitor(cfg.knn, self.preprocess[self.slots[0].name], device=str(rt.device))
        log.info("distill (%s mode): teacher %s (%s, %s parameters) -> students %s", cfg.mode,
                 self.teacher_info.path, self.teacher_info.kind, f"{self.teacher_info.num_parameters:,}",
                 ", ".join(f"{s.name} ({_count(self.par.raw_student, s.keys['backbone']):,})" for s in self.slots))

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
    def _check_compatible(self, saved_yaml: str, saved_world: int) -> None:
        saved = yaml.safe_load(saved_yaml)
        if not isinstance(saved, dict) or "students" not in saved:
            raise ConfigError(f"cannot resume {self.run_dir}: it holds a pretraining run, not a distillation run")
        now = self.cfg.model_dump(mode="json")
        for key in _IMMUTABLE_ON_RESUME:
            if saved.get(key) != now.get(key):
                raise ConfigError(f"cannot resume {self.run_dir}: '{key}' changed since its checkpoints were "
                                  "written (use a new run_dir)")
        super()._check_compatible(saved_yaml, saved_world)  # seed, crops, data, schedule; batch-size warning

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state.get("progress", {}).get("extra", {}).get("teacher_sha256")
        if saved is not None and saved != self.teacher_info.sha256:
            raise ConfigError(f"cannot resume {self.run_dir}: the teacher {self.teacher_info.path} changed since "
                              f"its checkpoints were written (sha256 {saved[:12]}... -> "
                              f"{self.teacher_info.sha256[:12]}...)")
        super()._restore(state)

    # ------------------------------------------------------------------ monitoring and export
    def _log(self, result: StepResult, values: dict[str, float], batch: dict, img_per_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.progress.step,
                                  "epoch": self.progress.step / self.cfg.schedule.epoch_length, **values}
        record.update({("total_loss" if k == "total" else k): v for k, v in result.losses.items()})
        record.update({f"grad_norm_{k}": v for k, v in result.grad_norms.items()})
        record.update(self.meta.indicators(teacher_temp=values["teacher_temp"]))
        record.update({"img_per_s": img_per_s, "images_seen": self.progress.images_seen,
                       "spikes_skipped": self.progress.skipped_steps, "rollbacks": self.progress.rollbacks,
                       "train_seconds": self.progress.train_seconds})
        floor = self.cfg.monitor.collapse_min_feature_std
        collapsed = [s.name for s in self.slots if record.get(f"{s.name}/feature_std", 1.0) < floor]
        if collapsed and self.progress.step >= self.cfg.schedule.epoch_length:
            record["collapse_warning"] = f"student CLS features collapsed (feature_std < {floor}): {collapsed}"
            log.warning("step %d: %s", self.progress.step, record["collapse_warning"])
        if self.metrics is not None:
            self.metrics.write(record)
        return record

    def _teacher_reference(self, periodic: bool) -> dict[str, float]:
        """k-NN of the frozen teacher (once per set of images), with the students' evaluation contract."""
        if periodic not in self._teacher_knn:
            backbone = copy.deepcopy(self.meta.frozen.backbone).float().eval()
            self.knn.preprocess = self._preprocess(backbone.config.patch_size)
            result = self.knn.evaluate(PlainTeacher(backbone, {}), periodic=periodic)
            self._teacher_knn[periodic] = {f"teacher/{k}": v for k, v in result.items()}
        return self._teacher_knn[periodic]

    def _knn_record(self, *, periodic: bool = False) -> dict[str, float] | None:
        students = gather_students(self.par.raw_teacher, self.slots, is_main=self.rt.is_main)
        out = None
        if students is not None and self.knn is not None:
            out = dict(self._teacher_reference(periodic)) if self.cfg.knn_teacher else {}
            for name, model in students.items():
                self.knn.preprocess = self.preprocess[name]
                result = self.knn.evaluate(model, periodic=periodic)
                out.update({f"{name}/{k}": v for k, v in result.items()})
                if "teacher/knn_top1" in out and out["teacher/knn_top1"] > 0:
                    out[f"{name}/knn_ratio"] = result["knn_top1"] / out["teacher/knn_top1"]
            if self.metrics is not None:
                self.metrics.write({"step": self.progress.step, **out})
        _barrier()
        return out

    def _export(self, last: dict[str, Any]) -> Path | None:
        students = gather_students(self.par.raw_teacher, self.slots, is_main=self.rt.is_main)
        root = None
        if students is not None:
            root = self.run_dir / ARTIFACTS_DIR
            base = self.cfg.artifact.name or f"dinoforge-distill-{self.run_dir.name}"
            details = {"step": self.progress.step, "data": self.cfg.data.source, "run_dir": str(self.run_dir),
                       "world_size": self.rt.world_size}
            for slot in self.slots:
                path = write_student_artifact(
                    root / slot.name, students[slot.name], name=f"{base}-{slot.name}", slot=slot,
                    teacher=self.teacher_info, preprocess=self.preprocess[slot.name], recipe=self._config_yaml(),
                    mode=self.cfg.mode, data_sha256=self.source.fingerprint,
                    metrics=student_metrics(last, slot.name), details=details,
                    include_heads=self.cfg.artifact.include_heads)
                log.info("student %s: artifact written to %s (step %d)", slot.name, path, self.progress.step)
        _barrier()
        return root


def _count(modules: Any, key: str) -> int:
    return sum(p.numel() for p in modules[key].parameters())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
