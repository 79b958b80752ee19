"""DINOv2 pretraining as a :class:`~dinoforge.pretrain.spec.TrainSpec`: what ``dinoforge pretrain`` trains.

The run is an :class:`~dinoforge.pretrain.meta_arch.SSLMetaArch` (student, EMA teacher, centres) fed with
deterministic multi-crop batches; it logs the teacher's collapse indicators, evaluates the teacher by k-NN and
exports it (backbone + heads) as a core model artifact under ``RUN_DIR/artifact/``. Everything else (loop,
optimizer, checkpoints, resume) is the generic :class:`~dinoforge.pretrain.trainer.Trainer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from dinoforge.core.artifact import Provenance
from dinoforge.core.config import config_to_yaml
from dinoforge.core.errors import CheckpointError
from dinoforge.core.runtime import Runtime, seed_everything
from dinoforge.pretrain.checkpointing import load_checkpoint, load_latest
from dinoforge.pretrain.config import PretrainConfig
from dinoforge.pretrain.dcp import read_dcp_tensors
from dinoforge.pretrain.data import BatchLayout, PretrainBatches
from dinoforge.pretrain.knn_monitor import KnnMonitor
from dinoforge.pretrain.masking import MaskingGenerator, official_max_num_patches
from dinoforge.pretrain.meta_arch import Centres
from dinoforge.pretrain.meta_init import build_parallel_meta_arch
from dinoforge.pretrain.monitor import collapse_warning
from dinoforge.pretrain.parallelize import Parallelized
from dinoforge.pretrain.sources import open_pretrain_source
from dinoforge.pretrain.spec import Precision, RunParts, check_unchanged, knn_enabled
from dinoforge.pretrain.teacher_export import default_preprocess, gather_teacher, resample_checkpoint_pos_embed, \
    write_teacher_artifact
from dinoforge.pretrain.train_loop import teacher_collapse_indicators
from dinoforge.pretrain.trainer import Trainer

log = logging.getLogger("dinoforge.pretrain")
_IMMUTABLE_ON_RESUME = ("model", "crops", "masking")


class PretrainSpec:
    """The pretraining run of a :class:`PretrainConfig` (see the module docstring).

    Args:
        cfg: the resolved recipe.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.knn: KnnMonitor | None = None

    def build(self, runtime: Runtime) -> RunParts:
        """Model (identical initial weights on every rank, optional warm start), parallelism and batches."""
        cfg = self.cfg
        self.rt = runtime
        self.source = open_pretrain_source(cfg.data.source)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.meta, par = build_parallel_meta_arch(cfg.model, cfg.parallel, world_size=runtime.world_size,
                                                  device=runtime.device)
        if cfg.init.from_checkpoint:
            self._warm_start(cfg.init.from_checkpoint, par)
        self.teacher = par.raw_teacher
        generator = MaskingGenerator(cfg.grid, max_num_patches=official_max_num_patches(
            cfg.crops.global_crops_size, cfg.model.backbone.patch_size), min_num_patches=cfg.masking.min_num_patches,
            min_aspect=cfg.masking.min_aspect)
        layout = BatchLayout(micro_batch=cfg.data.batch_size, accum=cfg.data.grad_accum,
                             world_size=runtime.world_size, rank=runtime.rank)
        batches = PretrainBatches(self.source, cfg.crops, layout, mask_generator=generator,
                                  mask_ratio=cfg.masking.mask_ratio_min_max,
                                  mask_probability=cfg.masking.mask_sample_probability, seed=cfg.seed)
        self.preprocess = cfg.artifact.preprocess or default_preprocess(
            cfg.crops.global_crops_size, cfg.model.backbone.patch_size, cfg.crops.mean, cfg.crops.std)
        if runtime.is_main and knn_enabled(cfg.knn):
            self.knn = KnnMonitor(cfg.knn, self.preprocess, device=str(runtime.device))
        return RunParts(model=self.meta, student=par.raw_student, teacher=par.raw_teacher,
                        state=Centres(self.meta), batches=batches)

    def _warm_start(self, source: str, par: Parallelized) -> None:
        """Load student/teacher weights of another run (fresh optimizer and schedule), resampling pos-embed."""
        path = Path(source)
        if path.is_dir():
            found = load_latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
            if found is None:
                raise CheckpointError(f"init.from_checkpoint: no checkpoint in {path}")
            state = found.state
        else:
            state = load_checkpoint(path)
        if "dcp_dir" in state:  # a sharded checkpoint: its student and teacher tensors, read whole
            state = {**state, **{key: read_dcp_tensors(state["dcp_dir"], key) for key in ("student", "teacher")}}
        model_cfg = self.cfg.model
        try:
            for key in ("student", "teacher"):
                weights = state[key]
                if self.cfg.init.resample_pos_embed:
                    weights = resample_checkpoint_pos_embed(weights, model_cfg)
                # full tensors in, this rank's shards kept (plain modules: an ordinary load)
                set_model_state_dict(getattr(par, f"raw_{key}"), weights,
                                     options=StateDictOptions(full_state_dict=True))
            Centres(self.meta).load_state_dict(state["centres"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"init.from_checkpoint {source}: weights do not fit the model: {err}") from err
        log.info("warm start from %s (position embedding resampled to a %d-grid)", source,
                 model_cfg.backbone.grid_size)

    def check_resume(self, saved_config: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """The model, crops and masking must be those the checkpoints were written with."""
        check_unchanged(saved_config, self.cfg.model_dump(mode="json"), _IMMUTABLE_ON_RESUME, run_dir=self.cfg.run_dir,
                        hint="use a new run_dir, or init.from_checkpoint for a warm start")

    def indicators(self, batch: dict, values: Mapping[str, float], precision: Precision) -> dict[str, float]:
        """The teacher's collapse indicators on this batch's global crops (one extra teacher pass)."""
        return teacher_collapse_indicators(self.meta, batch, teacher_temp=values["teacher_temp"],
                                           precision=precision)

    def collapse_warning(self, record: Mapping[str, Any]) -> str | None:
        """Feature collapse (teacher CLS spread) or uniform collapse (teacher entropy)."""
        return collapse_warning(dict(record), min_feature_std=self.cfg.monitor.collapse_min_feature_std,
                                max_entropy=self.cfg.monitor.collapse_max_entropy)

    def evaluate(self, step: int, *, periodic: bool) -> dict[str, float] | None:
        """k-NN accuracy of the teacher (main rank)."""
        teacher = gather_teacher(self.teacher, self.cfg.model, is_main=self.rt.is_main)
        if teacher is None or self.knn is None:
            return None
        return self.knn.evaluate(teacher, periodic=periodic)

    def export(self, step: int, last: Mapping[str, Any]) -> Path | None:
        """The teacher (backbone + heads) as a model artifact under ``RUN_DIR/artifact``."""
        teacher = gather_teacher(self.teacher, self.cfg.model, is_main=self.rt.is_main)
        if teacher is None:
            return None
        run_dir = Path(self.cfg.run_dir)
        metrics = {k: float(v) for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}
        prov = Provenance(source="pretrain", recipe=config_to_yaml(self.cfg),
                          data_manifest_sha256=self.source.fingerprint, metrics=metrics,
                          details={"step": step, "data": self.cfg.data.source, "run_dir": str(run_dir),
                                   "world_size": self.rt.world_size})
        name = self.cfg.artifact.name or f"dinoforge-pretrain-{run_dir.name}"
        path = write_teacher_artifact(run_dir / "artifact", teacher, name=name, preprocess=self.preprocess,
                                      provenance=prov, include_heads=self.cfg.artifact.include_heads)
        log.info("teacher artifact written to %s (step %d)", path, step)
        return path


def pretrain_trainer(cfg: PretrainConfig, runtime: Runtime | None = None) -> Trainer:
    """The trainer of a pretraining run: ``pretrain_trainer(cfg).run()`` is ``dinoforge pretrain``."""
    return Trainer(PretrainSpec(cfg), runtime)
