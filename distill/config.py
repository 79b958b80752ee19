"""The distillation recipe schema (:class:`DistillConfig`), loaded from YAML with ``key=value`` overrides.

A distillation recipe is a pretraining recipe whose ``model`` section is replaced by a frozen ``teacher``, a
list of ``students`` and the loss settings of the chosen ``mode``; every other section (``crops``,
``masking``, ``data``, ``schedule``, ``optim``, ``train``, ``parallel``, ``checkpoint``, ``monitor``, ``knn``,
``spike``, ``artifact``) is the pretraining one and means the same thing. Unknown keys are errors naming the
key; the resolved recipe is saved as ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dinoforge.core.backbone import BackboneConfig, get_arch
from dinoforge.core.config import StrictModel, load_config, recipe_names_in, resolve_recipe_in
from dinoforge.core.errors import ConfigError
from dinoforge.core.pooling import Pooling
from dinoforge.pretrain.blocks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArtifactConfig,
    CheckpointConfig,
    CropsConfig,
    DataConfig,
    KnnConfig,
    MaskingConfig,
    MonitorConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    SpikeConfig,
    TrainConfig,
)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
Mode = Literal["head", "feature"]


class TeacherPreprocessConfig(StrictModel):
    """An external teacher's own input: normalisation and the side it sees a global view at."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int = Field(224, gt=0, description="input side for a global crop (local crops scaled alike)")


class TeacherConfig(StrictModel):
    """The frozen teacher.

    ``kind: artifact`` (default): a model artifact (with heads for ``mode: head``), an official DINOv2 ``.pth``
    or a timm DINOv2 checkpoint named by ``path``. ``kind: torchvision | timm``: architecture ``arch`` with the
    state dict in ``weights`` (``.pth`` read with ``weights_only=True``, or ``.safetensors``). ``kind: onnx``:
    the ``.onnx`` file in ``weights``, run by onnxruntime. External kinds need ``mode: feature``.
    """

    kind: Literal["artifact", "torchvision", "timm", "onnx"] = "artifact"
    path: str | None = Field(None, description="artifact: directory or .pth / .pt / .bin / .safetensors checkpoint")
    weights: str | None = Field(None, description="torchvision / timm: state dict file; onnx: the .onnx file; "
                                "pkg:MODULE/path names a file inside an installed package")
    arch: str | None = Field(None, description="architecture name (artifact checkpoints: registered dinoforge "
                             "arch for what shapes cannot tell; torchvision / timm: the model name)")
    key_map: Literal["names", "order"] = Field("names", description="torchvision / timm: match the file's "
                                               "tensors by name, or by position (the same network saved by "
                                               "another library; every shape is checked)")
    num_heads: int | None = Field(None, gt=0, description="checkpoints: attention heads (default width / 64)")
    patch_size: int | None = Field(None, gt=0, description="checkpoints: patch size (checked against the kernel)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 casts the teacher's weights (half memory)")
    preprocess: TeacherPreprocessConfig = Field(default_factory=TeacherPreprocessConfig,
                                                description="external kinds: the teacher's own preprocessing")

    @model_validator(mode="after")
    def _check_source(self) -> TeacherConfig:
        if self.kind == "artifact":
            if self.path is None:
                raise ValueError("teacher.kind artifact needs teacher.path (artifact directory or checkpoint)")
            if self.weights is not None:
                raise ValueError("teacher.weights is for kind torchvision / timm / onnx; artifacts use teacher.path")
            return self
        if self.weights is None:
            raise ValueError(f"teacher.kind {self.kind} needs teacher.weights (the local weights file)")
        if self.kind in ("torchvision", "timm") and self.arch is None:
            raise ValueError(f"teacher.kind {self.kind} needs teacher.arch (e.g. mobilenet_v2)")
        if self.path is not None:
            raise ValueError(f"teacher.path is for kind artifact; kind {self.kind} reads teacher.weights")
        return self

    @property
    def location(self) -> str:
        """The file or directory the teacher is read from."""
        return str(self.path if self.kind == "artifact" else self.weights)


class StudentConfig(StrictModel):
    """One student. Its architecture is ``arch`` (a registered name) with ``backbone`` fields replaced, or a
    full ``backbone`` mapping, or (with neither) the architecture of the ``init`` artifact/checkpoint."""

    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="identifier; names outputs and metrics")
    arch: str | None = None
    backbone: dict[str, Any] = Field(default_factory=dict, description="BackboneConfig fields")
    init: str | None = Field(None, description="initialise the backbone from this artifact or checkpoint")
    seed: int | None = Field(None, description="initialisation seed (default: the run seed)")
    pooling: Pooling = Field("cls", description="the artifact card's default pooling: the vector serving, "
                             "export parity and evaluation use (cls, mean, cls+mean)")
    stem_from_teacher: bool = Field(False, description="a hybrid student (backbone.mobilenet_stem_blocks) starts "
                                    "its MobileNetV2 stem from the teacher's first blocks (teacher kind "
                                    "torchvision, arch mobilenet_v2)")
    stem_trainable: bool = Field(False, description="with stem_from_teacher: fine-tune the copied blocks (at the "
                                 "patch-embedding lr) instead of freezing them; frozen, the student's step "
                                 "skips the stem's backward pass (2.2x faster on the 2-core CPU)")

    @model_validator(mode="after")
    def _check_arch(self) -> StudentConfig:
        if self.arch is None and not self.backbone and self.init is None:
            raise ValueError(f"student {self.name!r}: give arch, backbone or init")
        if self.arch is not None or self.backbone:
            self.backbone_config()  # raises with the offending field named
        return self

    def backbone_config(self, fallback: BackboneConfig | None = None) -> BackboneConfig:
        """The student architecture (``fallback``: the init model's, used when neither arch nor backbone is set)."""
        if self.arch is None and not self.backbone:
            if fallback is None:
                raise ConfigError(f"student {self.name!r}: no architecture (give arch or backbone)")
            return fallback
        try:
            if self.arch is not None:
                return get_arch(self.arch, **self.backbone)
            return BackboneConfig(**self.backbone)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"student {self.name!r}: invalid backbone: {err}") from None


class HeadModeConfig(StrictModel):
    """``mode: head`` (DINOv2 paper): DINO + iBOT + KoLeo against the frozen heads' normalised targets."""

    centering: Literal["centering", "sinkhorn_knopp"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = Field(3, ge=1)
    dino_loss_weight: float = Field(1.0, ge=0)
    ibot_loss_weight: float = Field(1.0, ge=0)
    koleo_loss_weight: float = Field(0.1, ge=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    student_masking: bool = Field(False, description="false (paper): iBOT on every patch of unmasked global "
                                  "crops; true: pretraining-style masked tokens (masking section)")
    hidden_dim: int | None = Field(None, gt=0, description="student head width (default: the teacher's)")
    bottleneck_dim: int | None = Field(None, gt=0, description="student head bottleneck (default: the teacher's)")
    nlayers: int | None = Field(None, ge=1, description="student head depth (default: the teacher's)")

    @model_validator(mode="after")
    def _check_losses(self) -> HeadModeConfig:
        if self.dino_loss_weight == 0 and self.ibot_loss_weight == 0:
            raise ValueError("dino_loss_weight and ibot_loss_weight are both 0: nothing to train")
        return self


class FeatureModeConfig(StrictModel):
    """``mode: feature`` (head-free): match CLS and patch tokens through an adaptor."""

    cls_cosine_weight: float = Field(1.0, ge=0)
    cls_smooth_l1_weight: float = Field(1.0, ge=0)
    patch_cosine_weight: float = Field(1.0, ge=0)
    patch_smooth_l1_weight: float = Field(1.0, ge=0)
    smooth_l1_beta: float = Field(1.0, gt=0)
    adaptor: Literal["auto", "linear", "mlp", "none"] = Field(
        "auto", description="auto: linear when the widths differ, nothing when they are equal")
    adaptor_hidden_dim: int | None = Field(None, gt=0, description="mlp adaptor width (default: 2 x teacher's)")
    local_crops: bool = Field(True, description="also distil on the local crops (teacher sees them too)")
    mixup: float = Field(0.0, ge=0, le=1, description="probability that a crop is blended with another crop of "
                         "its group (weight uniform in [0, 1]); teacher and student see the same blend")

    @model_validator(mode="after")
    def _check_weights(self) -> FeatureModeConfig:
        if not any((self.cls_cosine_weight, self.cls_smooth_l1_weight, self.patch_cosine_weight,
                    self.patch_smooth_l1_weight)):
            raise ValueError("every feature loss weight is 0: nothing to train")
        return self


class DistillConfig(StrictModel):
    """A complete distillation recipe."""

    run_dir: str = Field(..., description="outputs: config.yaml, metrics.jsonl, checkpoints/, artifacts/NAME/")
    seed: int = 0
    mode: Mode = "head"
    teacher: TeacherConfig
    students: list[StudentConfig] = Field(..., min_length=1)
    grid_resample: Literal["area", "bilinear"] = Field(
        "area", description="how the teacher's patch grid is brought onto a student's grid when they differ")
    head: HeadModeConfig = Field(default_factory=HeadModeConfig)
    feature: FeatureModeConfig = Field(default_factory=FeatureModeConfig)
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
    knn_teacher: bool = Field(True, description="also k-NN the frozen teacher (once), the students' reference")
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    artifact: ArtifactConfig = Field(default_factory=ArtifactConfig)

    @model_validator(mode="after")
    def _check_students(self) -> DistillConfig:
        names = [s.name for s in self.students]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"student names must be unique; repeated: {duplicates}")
        if self.teacher.kind != "artifact" and self.mode != "feature":
            raise ValueError(f"a {self.teacher.kind} teacher has no DINO head: use mode: feature")
        if self.teacher.kind != "artifact" and self.knn_teacher:
            raise ValueError(f"knn_teacher: the in-run teacher k-NN needs a dinoforge teacher; set knn_teacher: "
                             f"false for a {self.teacher.kind} teacher (score it with dinoforge distill eval)")
        return self

    def global_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.data.batch_size * self.data.grad_accum * world_size


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a bundled distillation recipe (``tiny``, ``fmnist`` ...)."""
    return resolve_recipe_in(RECIPES_DIR, name_or_path)


def load_distill_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Load a recipe (file path or bundled name) with ``key=value`` overrides.

    Raises:
        ConfigError: missing file, unknown key (named), or invalid value.
    """
    path = resolve_recipe(recipe) if recipe is not None else None
    return load_config(DistillConfig, path, overrides)


def bundled_recipes() -> list[str]:
    """Names of the distillation recipes shipped with dinoforge."""
    return recipe_names_in(RECIPES_DIR)
