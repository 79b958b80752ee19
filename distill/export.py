"""The final models: each student's EMA as a plain CPU model, and as a core artifact naming its teacher.

Under FSDP the EMA is sharded, so a full copy is gathered (a collective every rank joins) and rebuilt on CPU
on rank 0, exactly as the pretraining teacher export does. Student ``s`` lives under the ``s_backbone.``,
``s_dino_head.`` ... prefixes of the flat EMA dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoforge.core.artifact import Provenance, save_artifact
from dinoforge.core.pooling import Pooling
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.heads import DINOHead
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.distill.students import StudentSlot
from dinoforge.distill.teacher import TeacherInfo
from dinoforge.pretrain.blocks import PlainTeacher

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
ARTIFACTS_DIR = "artifacts"


def _prefixed(state: dict[str, Any], key: str) -> dict[str, Any]:
    return {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}


def gather_students(ema: nn.ModuleDict, slots: list[StudentSlot], *, is_main: bool) -> dict[str, PlainTeacher] | None:
    """Full CPU copies (eval mode) of every student's EMA on the main rank; ``None`` elsewhere.

    Every rank must call it (FSDP gathers shards).
    """
    state = get_model_state_dict(ema, options=_FULL)
    if not is_main:
        return None
    out = {}
    for slot in slots:
        backbone = DinoVisionTransformer(slot.backbone.model_copy(update={"drop_path_rate": 0.0}))
        backbone.load_state_dict(_prefixed(state, slot.keys["backbone"]))
        heads = {}
        for name, head_cfg in slot.heads.items():
            heads[name] = DINOHead(head_cfg)
            heads[name].load_state_dict(_prefixed(state, slot.keys[name]))
            heads[name].eval()
        out[slot.name] = PlainTeacher(backbone=backbone.eval(), heads=heads)
    return out


def student_metrics(metrics: dict[str, Any], name: str) -> dict[str, float]:
    """A student's numbers out of a run's record: ``<name>/x`` -> ``x``, plus the teacher's ``teacher/x``."""
    out = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith(name + "/"):
            out[key[len(name) + 1:]] = float(value)
        elif key.startswith("teacher/") or key in ("teacher_forwards", "images_seen", "train_seconds"):
            out[key] = float(value)
    return out


def write_student_artifact(out_dir: Path, model: PlainTeacher, *, name: str, slot: StudentSlot,
                           teacher: TeacherInfo, preprocess: PreprocessConfig, recipe: str, mode: str,
                           data_sha256: str, metrics: dict[str, float], details: dict[str, Any],
                           include_heads: bool, pooling: Pooling = "cls") -> Path:
    """Write one student's EMA as an artifact (replacing an older one atomically).

    The provenance names the teacher: ``parent_sha256`` is the teacher artifact's ``weights_sha256`` (or the
    teacher checkpoint file's SHA-256) and ``parent`` its path.
    """
    prov = Provenance(source="distill", parent_sha256=teacher.sha256, parent=teacher.path, recipe=recipe,
                      data_manifest_sha256=data_sha256, metrics=metrics,
                      details={"mode": mode, "student": slot.name, "teacher_kind": teacher.kind,
                               "teacher_name": teacher.name, "teacher_num_parameters": teacher.num_parameters,
                               "student_init": slot.init, **details})
    heads = model.heads if include_heads and model.heads else None
    return save_artifact(out_dir, model.backbone, name=name, provenance=prov, preprocessing=preprocess,
                         heads=heads, default_pooling=pooling, overwrite=True)
