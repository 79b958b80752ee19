"""The pretraining recipe schema (:class:`PretrainConfig`), loaded from YAML with ``key=value`` overrides.

Sections: ``model`` (:class:`~dinoforge.pretrain.meta_arch.MetaArchConfig`: backbone, heads, losses),
``crops`` (multi-crop), ``masking`` (iBOT masks), ``data``, ``schedule`` (official schedules),
``optim``, ``train`` (device, precision, length), ``parallel``, ``checkpoint``, ``monitor``, ``knn``,
``spike`` and ``init`` (warm start / high-resolution adaptation), ``artifact`` (preprocessing contract of
the exported teacher). Every unknown key is an error naming it; the resolved config is saved in the run
directory as ``config.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel, load_config, recipe_names_in, resolve_recipe_in
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.pretrain.augment import CropsConfig
from dinoforge.pretrain.meta_arch import MetaArchConfig
from dinoforge.pretrain.optim import OptimConfig
from dinoforge.pretrain.parallelize import ParallelConfig
from dinoforge.pretrain.schedules import ScheduleConfig
from dinoforge.pretrain.spikes import SpikeConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class MaskingConfig(StrictModel):
    """iBOT masks (official: ratios 0.1-0.5 on half of the global crops, rectangles of >= 4 patches)."""

    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = Field(0.5, ge=0, le=1)
    min_num_patches: int = Field(4, ge=1)
    min_aspect: float = Field(0.3, gt=0)


class DataConfig(StrictModel):
    """Where images come from and how many per step."""

    source: str = Field("fmnist:train", description="core data spec: fmnist:train, folder:DIR, manifest:FILE")
    batch_size: int = Field(64, gt=0, description="images per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    num_workers: int = Field(0, ge=0)


class TrainConfig(StrictModel):
    """Device, numerics and length of the run."""

    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice)")
    max_steps: int | None = Field(None, gt=0, description="stop early (schedules still span all epochs)")
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) after this wall time")
    host_mmap_threshold_mib: float | None = Field(
        None, gt=0, le=32, description="glibc: host buffers of at least this size are returned to the OS when "
        "freed (sharded steps free many; the dynamic default keeps them; core/hostmem.py). null: glibc's default")


class CheckpointConfig(StrictModel):
    """Never lose a run."""

    every_steps: int = Field(500, gt=0)
    keep: int = Field(3, gt=0, description="checkpoints kept (older ones deleted; >= 2 allows fallback)")
    resume: bool = Field(True, description="continue from the newest good checkpoint of run_dir")
    artifact_every_steps: int | None = Field(None, gt=0, description="also write the teacher artifact")
    format: Literal["file", "dcp"] = Field("file", description="file: one file gathered on rank 0; dcp: sharded "
                                           "torch.distributed.checkpoint directory, resumable at any world size")
    async_save: bool = Field(False, description="dcp: write in the background while training continues")


class MonitorConfig(StrictModel):
    """Logging and collapse warnings."""

    log_every: int = Field(10, gt=0)
    progress: bool = True
    tensorboard: bool = False
    collapse_min_feature_std: float = Field(0.05, ge=0)
    collapse_max_entropy: float = Field(0.995, gt=0, le=1)


class KnnConfig(StrictModel):
    """Periodic k-NN of the teacher on a labelled set (DINOv2 protocol: cosine, weighted votes)."""

    every_steps: int | None = Field(None, gt=0, description="None disables the periodic k-NN")
    train: str = "fmnist:train[~5000@0]"
    test: str = "fmnist:test[~2000@0]"
    periodic_train: str | None = Field(None, description="smaller sets for the every_steps evaluations "
                                       "(default: train / test)")
    periodic_test: str | None = None
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    batch_size: int = Field(256, gt=0)
    at_start: bool = Field(False, description="also evaluate the initial (random) teacher: the baseline")
    at_end: bool = True


class InitConfig(StrictModel):
    """Start from another run's weights (warm start, high-resolution adaptation)."""

    from_checkpoint: str | None = Field(None, description="a run dir or .ckpt file; weights only, fresh schedule")
    resample_pos_embed: bool = Field(True, description="resample the position embedding to this model's grid")


class ArtifactConfig(StrictModel):
    """The teacher artifact written at the end (and periodically)."""

    name: str | None = None
    preprocess: PreprocessConfig | None = Field(None, description="default: resize to the global crop size "
                                                "with the crops' mean/std")
    include_heads: bool = True


class PretrainConfig(StrictModel):
    """A complete pretraining recipe."""

    run_dir: str = Field(..., description="outputs: config.yaml, metrics.jsonl, checkpoints/, artifact/")
    seed: int = 0
    model: MetaArchConfig
    crops: CropsConfig = Field(default_factory=CropsConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    artifact: ArtifactConfig = Field(default_factory=ArtifactConfig)

    @model_validator(mode="after")
    def _check_sizes(self) -> PretrainConfig:
        patch = self.model.backbone.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            if size % patch:
                raise ValueError(f"crops.{name}={size} is not a multiple of the patch size {patch}")
        return self

    @property
    def grid(self) -> int:
        """Patch-grid side of a global crop."""
        return self.crops.global_crops_size // self.model.backbone.patch_size

    def global_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.data.batch_size * self.data.grad_accum * world_size


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (``tiny``, ``fmnist``, ``vits14`` ...)."""
    return resolve_recipe_in(RECIPES_DIR, name_or_path)


def load_pretrain_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load a recipe (file path or bundled name) with ``key=value`` overrides.

    Raises:
        ConfigError: missing file, unknown key (named), or invalid value.
    """
    path = resolve_recipe(recipe) if recipe is not None else None
    return load_config(PretrainConfig, path, overrides)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with dinoforge."""
    return recipe_names_in(RECIPES_DIR)
