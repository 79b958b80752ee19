"""Building the students: backbones (random or from an artifact), fresh heads or adaptors, one flat module dict.

All students of a run live in one flat ``ModuleDict`` keyed ``<student>_<part>`` (``small_backbone``,
``small_dino_head``, ``small_adaptor`` ...). That is the shape the pretraining machinery works on: the
parameter-group rule, per-sub-module gradient clipping, DDP/FSDP wrapping, the EMA update and checkpoints
all iterate a student ``ModuleDict`` by key, so every student gets exactly what a pretraining student gets.

Each student is initialised under its own seed (``students[i].seed``, default the run seed), so a student's
initial weights do not depend on which other students share the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dinoforge.core.backbone import BackboneConfig, DinoVisionTransformer
from dinoforge.core.backbone.cnn_stem import load_mobilenet_stem
from dinoforge.core.backbone.convert import check_state_dict
from dinoforge.core.backbone.heads import DINOHead, HeadConfig
from dinoforge.core.checkpoint import load_backbone
from dinoforge.core.errors import CheckpointError, ConfigError
from dinoforge.core.pretrained_cnn import locate_weights, read_state_dict
from dinoforge.distill.config import DistillConfig, HeadModeConfig, StudentConfig, TeacherConfig
from dinoforge.distill.feature_loss import build_adaptor
from dinoforge.distill.teacher import FrozenTeacher
from dinoforge.pretrain.blocks import HeadShape, MetaArchConfig


@dataclass
class StudentSlot:
    """One student of the run.

    Attributes:
        name: the recipe's student name.
        backbone: its architecture.
        keys: part (``backbone``, ``dino_head``, ``ibot_head``, ``adaptor``) -> key in the flat module dict.
        meta_config: head mode: the pretraining model config the losses run with (``None`` in feature mode).
        heads: head mode: shapes of the student's heads (to rebuild them for the artifact).
        init: the artifact/checkpoint its backbone started from, if any.
    """

    name: str
    backbone: BackboneConfig
    keys: dict[str, str]
    meta_config: MetaArchConfig | None = None
    heads: dict[str, HeadConfig] = field(default_factory=dict)
    init: str | None = None


def _student_head_shape(cfg: HeadModeConfig, teacher_head: HeadConfig) -> HeadShape:
    """Fresh student head: the teacher's K, the recipe's (or the teacher's) width, bottleneck and depth."""
    return HeadShape(out_dim=teacher_head.out_dim, hidden_dim=cfg.hidden_dim or teacher_head.hidden_dim,
                     bottleneck_dim=cfg.bottleneck_dim or teacher_head.bottleneck_dim,
                     nlayers=cfg.nlayers or teacher_head.nlayers)


def head_meta_config(cfg: HeadModeConfig, backbone: BackboneConfig, teacher: FrozenTeacher) -> MetaArchConfig:
    """The pretraining model config of a head-mode student (its heads shaped after the teacher's)."""
    dino = _student_head_shape(cfg, teacher.parts["dino_head"].config)
    separate = "ibot_head" in teacher.head_names
    ibot = _student_head_shape(cfg, teacher.parts["ibot_head"].config) if separate else dino
    return MetaArchConfig(backbone=backbone, dino_head=dino, ibot_head=ibot, ibot_separate_head=separate,
                          centering=cfg.centering, sinkhorn_iterations=cfg.sinkhorn_iterations,
                          dino_loss_weight=cfg.dino_loss_weight, ibot_loss_weight=cfg.ibot_loss_weight,
                          koleo_loss_weight=cfg.koleo_loss_weight, student_temp=cfg.student_temp,
                          center_momentum=cfg.center_momentum)


def _init_backbone(spec: StudentConfig) -> DinoVisionTransformer | None:
    if spec.init is None:
        return None
    try:
        return load_backbone(spec.init).backbone
    except CheckpointError as err:
        raise CheckpointError(f"student {spec.name!r} init: {err}") from err


def _student_backbone(spec: StudentConfig, seed: int) -> tuple[DinoVisionTransformer, BackboneConfig]:
    source = _init_backbone(spec)
    config = spec.backbone_config(source.config if source is not None else None)
    torch.manual_seed(seed)
    backbone = DinoVisionTransformer(config)
    if source is not None:
        state = source.state_dict()
        try:
            check_state_dict(state, backbone.state_dict())
        except CheckpointError as err:
            raise CheckpointError(f"student {spec.name!r}: init {spec.init} does not fit its architecture: "
                                  f"{err}") from err
        backbone.load_state_dict(state)
    return backbone, config


def stem_from_teacher(backbone: DinoVisionTransformer, teacher: TeacherConfig, student: str, *,
                      trainable: bool = False) -> None:
    """Copy the teacher's first MobileNetV2 blocks into a hybrid student's stem (``features.i.*`` -> ``stem.i.*``).

    Frozen (the default), the stem is the teacher's own tokenizer and the student learns the transformer on top.

    Raises:
        ConfigError: the student has no MobileNetV2 stem, or the teacher is not a torchvision MobileNetV2.
        CheckpointError: the teacher's file lacks a tensor of the stem or has another shape.
    """
    blocks = backbone.config.mobilenet_stem_blocks
    if not blocks or teacher.kind != "torchvision" or teacher.arch != "mobilenet_v2":
        raise ConfigError(f"student {student!r}: stem_from_teacher needs backbone.mobilenet_stem_blocks > 0 and a "
                          f"teacher of kind torchvision, arch mobilenet_v2 (got blocks {blocks}, teacher "
                          f"{teacher.kind}:{teacher.arch})")
    state = read_state_dict(locate_weights(teacher.weights or ""))
    load_mobilenet_stem(backbone.patch_embed.stem, state, trainable=trainable,
                        what=f"student {student!r}: the teacher's weights")


def build_students(cfg: DistillConfig, teacher: FrozenTeacher) -> tuple[list[StudentSlot], dict[str, nn.Module]]:
    """Build every student (backbone, and fresh heads or an adaptor) under its own seed.

    Returns:
        The slots, and the flat ``{<student>_<part>: module}`` dict in recipe order.
    """
    slots: list[StudentSlot] = []
    modules: dict[str, nn.Module] = {}
    for spec in cfg.students:
        seed = cfg.seed if spec.seed is None else spec.seed
        backbone, config = _student_backbone(spec, seed)
        if spec.stem_from_teacher:
            stem_from_teacher(backbone, cfg.teacher, spec.name, trainable=spec.stem_trainable)
        if not (cfg.mode == "head" and cfg.head.student_masking):
            # Never used without student masking: frozen, so that DDP does not wait for its gradient and the
            # optimizer does not decay it.
            backbone.mask_token.requires_grad_(False)
        parts: dict[str, nn.Module] = {"backbone": backbone}
        slot = StudentSlot(name=spec.name, backbone=config, keys={}, init=spec.init)
        if cfg.mode == "head":
            slot.meta_config = head_meta_config(cfg.head, config, teacher)
            slot.heads["dino_head"] = slot.meta_config.dino_head.head_config(config.embed_dim)
            if slot.meta_config.ibot_separate_head:
                slot.heads["ibot_head"] = slot.meta_config.ibot_head.head_config(config.embed_dim)
            parts.update({name: DINOHead(head_cfg) for name, head_cfg in slot.heads.items()})
        else:
            adaptor = build_adaptor(cfg.feature, config.embed_dim, teacher.config.embed_dim)
            if adaptor is not None:
                parts["adaptor"] = adaptor
        for part, module in parts.items():
            slot.keys[part] = f"{spec.name}_{part}"
            modules[slot.keys[part]] = module
        slots.append(slot)
    check_geometry(cfg, teacher.config, slots)
    return slots, modules


def _multiple(size: int, patch: int, what: str, who: str) -> str | None:
    return None if size % patch == 0 else f"crops.{what}={size} is not a multiple of the {who} patch size {patch}"


def check_geometry(cfg: DistillConfig, teacher: BackboneConfig, slots: list[StudentSlot]) -> None:
    """Crop sizes must tile into whole patches for every model that sees them; head mode needs one grid.

    Raises:
        ConfigError: naming the size and the model.
    """
    crops = cfg.crops
    uses_local = crops.local_crops_number > 0
    teacher_sees_local = cfg.mode == "feature" and cfg.feature.local_crops and uses_local
    problems = [_multiple(crops.global_crops_size, teacher.patch_size, "global_crops_size", "teacher")]
    if teacher_sees_local:
        problems.append(_multiple(crops.local_crops_size, teacher.patch_size, "local_crops_size", "teacher"))
    for slot in slots:
        who = f"student {slot.name!r}"
        problems.append(_multiple(crops.global_crops_size, slot.backbone.patch_size, "global_crops_size", who))
        if uses_local:
            problems.append(_multiple(crops.local_crops_size, slot.backbone.patch_size, "local_crops_size", who))
    if cfg.mode == "head" and len({s.backbone.patch_size for s in slots}) > 1:
        sizes = {s.name: s.backbone.patch_size for s in slots}
        problems.append(f"mode: head needs every student on one patch grid (patch sizes {sizes}); "
                        "distil students of other patch sizes in separate runs or use mode: feature")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
