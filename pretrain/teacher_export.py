"""The teacher as a plain model on rank 0: for the artifact, the periodic k-NN and the high-res warm start.

Under FSDP the teacher is sharded, so a full copy is gathered (a collective every rank joins) and rebuilt as a
plain :class:`~dinoforge.core.backbone.DinoVisionTransformer` (+ heads) on CPU on rank 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoforge.core.artifact import Provenance, save_artifact
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.heads import DINOHead
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.pretrain.meta_arch import MetaArchConfig, build_student

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class PlainTeacher:
    """A CPU copy of the teacher (eval mode)."""

    backbone: DinoVisionTransformer
    heads: dict[str, DINOHead]


def gather_teacher(teacher: nn.ModuleDict, model_cfg: MetaArchConfig, *, is_main: bool) -> PlainTeacher | None:
    """Full CPU copy of ``teacher`` on the main rank (``None`` elsewhere). Every rank must call it."""
    state = get_model_state_dict(teacher, options=_FULL)
    if not is_main:
        return None
    plain = build_student(model_cfg.model_copy(update={
        "backbone": model_cfg.backbone.model_copy(update={"drop_path_rate": 0.0})}))
    plain.load_state_dict(state)
    plain.eval()
    # build_student fills the ModuleDict with a backbone and DINOHead heads; ModuleDict types them nn.Module
    backbone = cast(DinoVisionTransformer, plain["backbone"])
    heads = {k: cast(DINOHead, copy.deepcopy(m)) for k, m in plain.items() if k != "backbone"}
    return PlainTeacher(backbone=backbone, heads=heads)


def default_preprocess(global_crops_size: int, patch_size: int, mean: tuple[float, float, float],
                       std: tuple[float, float, float]) -> PreprocessConfig:
    """Evaluation contract matching training: resize to the global crop size, the crops' normalisation."""
    return PreprocessConfig(mode="resize", size=global_crops_size, resize_size=None, mean=mean, std=std,
                            patch_size=patch_size)


def write_teacher_artifact(out_dir: Path, teacher: PlainTeacher, *, name: str, preprocess: PreprocessConfig,
                           provenance: Provenance, include_heads: bool) -> Path:
    """Write the teacher backbone (and heads) as a core model artifact, replacing an older one atomically."""
    heads = teacher.heads if include_heads else None
    return save_artifact(out_dir, teacher.backbone, name=name, provenance=provenance, preprocessing=preprocess,
                         heads=heads, overwrite=True)


@torch.no_grad()
def resample_checkpoint_pos_embed(state: dict[str, torch.Tensor], model_cfg: MetaArchConfig) -> dict[str, torch.Tensor]:
    """High-resolution adaptation: resample ``backbone.pos_embed`` of a student/teacher state to this grid."""
    from dinoforge.core.backbone.pos_embed import resample_pos_embed_param

    key = "backbone.pos_embed"
    if key not in state:
        return state
    grid = model_cfg.backbone.grid_size
    old = state[key]
    if old.shape[1] - 1 == grid * grid:
        return state
    new = resample_pos_embed_param(old, grid, offset=model_cfg.backbone.interpolate_offset,
                                   antialias=model_cfg.backbone.interpolate_antialias)
    return {**state, key: new}
