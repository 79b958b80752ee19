"""The teacher as a plain model: for the artifact, the periodic k-NN and the high-res warm start.

In a running job the teacher may be sharded, so a full copy is gathered (a collective every rank joins) and
rebuilt as a plain :class:`~dinoforge.core.backbone.DinoVisionTransformer` (+ heads) on CPU on rank 0
(:func:`gather_teacher`). Offline, :func:`export_checkpoint` (``dinoforge pretrain-export``) turns a saved
checkpoint into the same artifact in one process with no process group: from a sharded (DCP) checkpoint it
reads only the teacher's entries, each assembled from its shard files, never the student or the optimizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoforge.core.artifact import Provenance, save_artifact
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.heads import DINOHead
from dinoforge.core.errors import CheckpointError
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.pretrain.checkpointing import load_checkpoint, load_latest
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
    return plain_teacher(state, model_cfg)


def plain_teacher(state: dict[str, torch.Tensor], model_cfg: MetaArchConfig) -> PlainTeacher:
    """The teacher modules around a full teacher state dict (the tensors are used as they are, not copied)."""
    with torch.device("meta"):  # no throw-away random init: every tensor comes from ``state``
        plain = build_student(model_cfg.model_copy(update={
            "backbone": model_cfg.backbone.model_copy(update={"drop_path_rate": 0.0})}))
    plain.load_state_dict(state, assign=True)
    plain.eval()
    # build_student fills the ModuleDict with a backbone and DINOHead heads; ModuleDict types them nn.Module
    backbone = cast(DinoVisionTransformer, plain["backbone"])
    heads = {k: cast(DINOHead, copy.deepcopy(m)) for k, m in plain.items() if k != "backbone"}
    return PlainTeacher(backbone=backbone, heads=heads)


def _read_checkpoint(source: Path) -> tuple[Path, dict[str, Any]]:
    """A run directory (its newest good checkpoint), a ``.ckpt`` file or a ``.dcp`` directory."""
    if source.is_dir() and source.suffix != ".dcp":
        found = load_latest(source / "checkpoints" if (source / "checkpoints").is_dir() else source)
        if found is None:
            raise CheckpointError(f"{source} holds no training checkpoint")
        return found.path, found.state
    return source, load_checkpoint(source)


def export_checkpoint(source: str | Path, out_dir: str | Path, *, name: str | None = None,
                      include_heads: bool = True) -> Path:
    """Write the teacher of a training checkpoint as a model artifact, in this process alone.

    From a sharded checkpoint only the ``teacher`` entries are read (DCP assembles each tensor from the shard
    files that hold it); the student and the optimizer state, three quarters of the checkpoint, stay on disk.

    Raises:
        CheckpointError: no checkpoint, a damaged one, or one that is not a pretraining checkpoint.
    """
    from dinoforge.pretrain.config import PretrainConfig
    from dinoforge.pretrain.dcp import read_dcp_tensors

    path, state = _read_checkpoint(Path(source))
    if state.get("format") != "dinoforge-pretrain" or "config_yaml" not in state:
        raise CheckpointError(f"{path} is not a dinoforge pretraining checkpoint")
    cfg = PretrainConfig.model_validate(yaml.safe_load(state["config_yaml"]))
    weights = read_dcp_tensors(state["dcp_dir"], "teacher") if "dcp_dir" in state else state["teacher"]
    try:
        teacher = plain_teacher(weights, cfg.model)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: the teacher does not fit the checkpoint's recipe: {err}") from err
    preprocess = cfg.artifact.preprocess or default_preprocess(
        cfg.crops.global_crops_size, cfg.model.backbone.patch_size, cfg.crops.mean, cfg.crops.std)
    step = int(state["progress"]["step"])
    prov = Provenance(source="pretrain", recipe=state["config_yaml"], parent=str(path),
                      details={"step": step, "data": cfg.data.source, "checkpoint": str(path),
                               "world_size": int(state.get("world_size", 1))})
    return write_teacher_artifact(Path(out_dir), teacher, name=name or f"dinoforge-pretrain-step{step}",
                                  preprocess=preprocess, provenance=prov, include_heads=include_heads)


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
