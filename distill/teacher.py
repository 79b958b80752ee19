"""The frozen teacher: an artifact (backbone + heads), a head-less official / timm DINOv2 checkpoint, or an
external network (torchvision, timm, ONNX; :mod:`.external_teacher`).

The teacher never trains: parameters have ``requires_grad=False``, it stays in eval mode (no drop path), its
forward runs under ``torch.no_grad`` and, with ``precision: bf16``, its weights are stored in bfloat16 (half
the memory) while its outputs are returned in float32. Every backbone pass is counted
(:attr:`FrozenTeacher.forward_passes`): several students share one pass per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinoforge.core.artifact import ModelCard, is_artifact, load_artifact
from dinoforge.core.backbone import BackboneConfig, DinoFeatures, DinoVisionTransformer
from dinoforge.core.checkpoint import load_backbone
from dinoforge.core.errors import CheckpointError, ConfigError
from dinoforge.core.fileio import sha256_file
from dinoforge.distill.config import DistillConfig, TeacherConfig
from dinoforge.distill.external_teacher import (ExternalTeacher, OnnxTeacher, TorchTeacher, ViewNorm,
                                                load_strict, locate_weights, read_state_dict)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TeacherInfo:
    """Where the teacher came from (recorded in every student artifact's provenance).

    Attributes:
        path: what ``teacher.path`` named.
        kind: ``artifact`` or the checkpoint's naming convention (``official``, ``timm``, ``dinoforge``).
        sha256: the artifact's ``weights_sha256``, or the checkpoint file's SHA-256.
        name: the artifact's model name, or the file name.
        num_parameters: backbone parameters.
    """

    path: str
    kind: str
    sha256: str
    name: str
    num_parameters: int


class FrozenTeacher(nn.Module):
    """A frozen backbone and (optionally) its DINO / iBOT heads.

    Args:
        backbone: the teacher backbone.
        heads: ``{"dino_head": ..., "ibot_head": ...}`` (empty for head-less checkpoints).
        precision: ``fp32`` or ``bf16`` weights.

    Attributes:
        parts: ``ModuleDict`` with ``backbone`` and the heads (the pretraining ``teacher`` layout).
        forward_passes: number of backbone passes run so far (one per crop group).
    """

    def __init__(self, backbone: DinoVisionTransformer, heads: dict[str, nn.Module],
                 precision: str = "fp32") -> None:
        super().__init__()
        self.dtype = _DTYPES[precision]
        self.parts = nn.ModuleDict({"backbone": backbone, **heads})
        self.parts.to(self.dtype).requires_grad_(False).eval()
        self.forward_passes = 0

    @property
    def backbone(self) -> DinoVisionTransformer:
        """The frozen backbone."""
        return self.parts["backbone"]  # type: ignore[return-value]

    @property
    def config(self) -> BackboneConfig:
        """The backbone's :class:`~dinoforge.core.backbone.BackboneConfig`."""
        return self.backbone.config

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the heads the teacher carries."""
        return tuple(k for k in self.parts if k != "backbone")

    def train(self, mode: bool = True) -> FrozenTeacher:
        """The teacher always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def features(self, crops: Sequence[torch.Tensor]) -> list[DinoFeatures]:
        """Backbone tokens of several crop groups in one list pass (groups never attend to each other).

        Args:
            crops: groups ``[B_g, 3, H_g, W_g]``.

        Returns:
            One :class:`DinoFeatures` per group, float32: ``x_norm_clstoken [B_g, D]``,
            ``x_norm_patchtokens [B_g, h*w, D]`` ...
        """
        self.forward_passes += len(crops)
        outs = self.backbone.forward_dino_list([c.to(self.dtype) for c in crops], [None] * len(crops))
        return [{k: v.float() if torch.is_tensor(v) else v for k, v in o.items()} for o in outs]  # type: ignore[misc]

    @torch.no_grad()
    def head(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` (float32) of head ``name`` on tokens ``[N, D]``."""
        return self.parts[name](tokens.to(self.dtype)).float()


#: What :func:`load_teacher` returns: a dinoforge ViT with heads, or an external network.
Teacher = FrozenTeacher | ExternalTeacher


def _info_from_card(path: Path, card: ModelCard) -> TeacherInfo:
    return TeacherInfo(path=str(path), kind="artifact", sha256=card.weights_sha256, name=card.name,
                       num_parameters=card.num_parameters)


def load_teacher(cfg: TeacherConfig, views: ViewNorm | None = None) -> tuple[Teacher, TeacherInfo]:
    """Load and freeze the teacher named by the recipe (on CPU; the trainer moves it).

    Args:
        cfg: the recipe's ``teacher`` section.
        views: how the shared views arrive (the recipe's crop normalisation and global size); external
            kinds need it to re-normalise and resize each view for themselves.

    Raises:
        CheckpointError / ArtifactError: the file does not hold a loadable model or its keys do not match.
        ConfigError: unknown architecture, or an external teacher without ``views``.
    """
    if cfg.kind != "artifact":
        if views is None:
            raise ConfigError(f"a {cfg.kind} teacher needs the recipe's view normalisation (crops.mean/std/size)")
        return load_external_teacher(cfg, views)
    path = Path(cfg.path or "").expanduser()
    if not path.exists():
        raise CheckpointError(f"teacher.path {cfg.path} does not exist (give a model artifact directory or an "
                              "official / timm checkpoint file)")
    if path.is_dir() and is_artifact(path):
        art = load_artifact(path)
        teacher = FrozenTeacher(art.backbone, dict(art.heads), cfg.precision)
        return teacher, _info_from_card(path, art.card)
    loaded = load_backbone(path, num_heads=cfg.num_heads, patch_size=cfg.patch_size, arch=cfg.arch)
    info = TeacherInfo(path=str(path), kind=loaded.source_format, sha256=loaded.sha256, name=path.name,
                       num_parameters=sum(p.numel() for p in loaded.backbone.parameters()))
    return FrozenTeacher(loaded.backbone, {}, cfg.precision), info


def crop_views(cfg: DistillConfig) -> ViewNorm:
    """How the recipe's crops reach a teacher: their normalisation and the global crop side."""
    crops = cfg.crops
    return ViewNorm(tuple(crops.mean), tuple(crops.std), crops.global_crops_size)  # type: ignore[arg-type]


def load_external_teacher(cfg: TeacherConfig, views: ViewNorm) -> tuple[ExternalTeacher, TeacherInfo]:
    """A torchvision / timm network with its local state dict, or an ONNX model (see :mod:`.external_teacher`).

    Raises:
        CheckpointError: missing or unreadable weights, keys or shapes that do not match (a few named).
        ConfigError: unknown architecture.
    """
    path = locate_weights(cfg.weights or "")
    if not path.is_file():
        raise CheckpointError(f"teacher.weights {cfg.weights} does not exist (give the local weights file)")
    pre = cfg.preprocess
    if cfg.kind == "onnx":
        teacher: ExternalTeacher = OnnxTeacher(path, views, pre.mean, pre.std, pre.size)
        count = 0
    else:
        model = build_architecture(cfg.kind, str(cfg.arch))
        load_strict(model, read_state_dict(path), f"teacher {cfg.kind}:{cfg.arch} from {path}",
                    by_order=cfg.key_map == "order")
        count = sum(p.numel() for p in model.parameters())
        teacher = TorchTeacher(model, cfg.kind, views, pre.mean, pre.std, pre.size, _DTYPES[cfg.precision])
    info = TeacherInfo(path=str(path), kind=f"{cfg.kind}:{cfg.arch}" if cfg.arch else cfg.kind,
                       sha256=sha256_file(path), name=path.name, num_parameters=count)
    return teacher, info


def build_architecture(kind: str, arch: str) -> nn.Module:
    """An untrained torchvision or timm model by name (weights come from the recipe's file, never a download).

    Raises:
        ConfigError: the library does not know ``arch`` (close names suggested).
    """
    if kind == "timm":
        import timm

        known = timm.list_models()
        if arch not in known:
            raise ConfigError(f"unknown timm architecture {arch!r}; close names: {_close(arch, known)}")
        return timm.create_model(arch, pretrained=False)
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        raise ConfigError(f"unknown torchvision architecture {arch!r}; close names: {_close(arch, known)}")
    return torchvision.models.get_model(arch, weights=None)


def _close(name: str, known: Sequence[str]) -> str:
    import difflib

    return ", ".join(difflib.get_close_matches(name, known, n=4, cutoff=0.5)) or "none"


def require_heads(teacher: Teacher, info: TeacherInfo) -> None:
    """Head-based distillation needs the teacher's DINO head.

    Raises:
        ConfigError: the teacher has no ``dino_head`` (official and timm checkpoints never have one).
    """
    if "dino_head" not in getattr(teacher, "head_names", ()):
        raise ConfigError(f"mode: head needs a teacher with a DINO head, but {info.path} ({info.kind}) has none; "
                          "use mode: feature for head-less teachers (official DINOv2 and timm weights)")
