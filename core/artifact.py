"""Model artifacts: the files every stage hands to the next.

An artifact is a directory with

* ``model.safetensors``: backbone tensors under ``backbone.*`` (dinoforge/timm names) and, optionally, heads
  under ``<head name>.*`` (``dino_head``, ``ibot_head``);
* ``model.json``: the :class:`~dinoforge.core.card.ModelCard` (torch-free, :mod:`dinoforge.core.card`) — architecture, embedding dims, preprocessing contract, heads,
  provenance (parent artifact hash, recipe, data manifest hash, metrics), format version, weights hash.

Writes are atomic (built under a temporary name, renamed into place); loads validate everything and fail
with an :class:`~dinoforge.core.errors.ArtifactError` that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dinoforge.core import __version__
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.convert import check_state_dict
from dinoforge.core.backbone.heads import DINOHead
from dinoforge.core.card import (CARD_FILE, FORMAT_VERSION, WEIGHTS_FILE, ModelCard, Provenance, embedding_dims,
                                 is_artifact, read_card)
from dinoforge.core.errors import ArtifactError, CheckpointError
from dinoforge.core.fileio import atomic_directory, atomic_write_json, sha256_file
from dinoforge.core.pooling import Pooling
from dinoforge.core.preprocess import PreprocessConfig

__all__ = ["CARD_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "Artifact", "ModelCard", "Provenance", "embedding_dims",
           "is_artifact", "load_artifact", "read_card", "save_artifact", "validate_artifact"]


@dataclass
class Artifact:
    """A loaded artifact: its card, the backbone (eval mode) and any heads."""

    path: Path
    card: ModelCard
    backbone: DinoVisionTransformer
    heads: dict[str, DINOHead] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Identity of the artifact (hash of its weights file)."""
        return self.card.weights_sha256


def _flatten(backbone: nn.Module, heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for name, head in heads.items():
        tensors.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    # safetensors refuses shared/non-contiguous storage; artifacts are always fp32-contiguous copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_artifact(out_dir: str | Path, backbone: DinoVisionTransformer, *, name: str, provenance: Provenance,
                  preprocessing: PreprocessConfig | None = None, heads: dict[str, DINOHead] | None = None,
                  default_pooling: Pooling = "cls", overwrite: bool = False) -> Path:
    """Write an artifact directory atomically.

    Args:
        out_dir: destination directory (must not exist unless ``overwrite``).
        backbone: the model; its ``config`` becomes the card's architecture.
        name: human-readable model name.
        provenance: where it came from.
        preprocessing: contract; defaults to ImageNet centre-crop 224 with the model's patch size.
        heads: optional DINO/iBOT heads to ship with the backbone.
        default_pooling: the pooling a server uses unless a request says otherwise.

    Returns:
        The artifact path.
    """
    heads = heads or {}
    cfg = backbone.config
    preprocessing = preprocessing or PreprocessConfig(patch_size=cfg.patch_size)
    tensors = _flatten(backbone, heads)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as staging:
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "dinoforge": __version__})
            card = ModelCard(
                name=name, architecture=cfg, embed_dim=cfg.embed_dim, embedding_dims=embedding_dims(cfg.embed_dim),
                default_pooling=default_pooling, preprocessing=preprocessing,
                heads={k: h.config for k, h in heads.items()}, provenance=provenance,
                num_parameters=sum(p.numel() for p in backbone.parameters()),
                weights_sha256=sha256_file(staging / WEIGHTS_FILE),
            )
            atomic_write_json(staging / CARD_FILE, card.model_dump(mode="json"))
    except FileExistsError as err:
        raise ArtifactError(f"{out_dir} already exists; choose another --out or remove it") from err
    return Path(out_dir)


def _read_weights(root: Path, card: ModelCard, verify_hash: bool) -> dict[str, torch.Tensor]:
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"artifact {root} has no {WEIGHTS_FILE}")
    if verify_hash and sha256_file(weights) != card.weights_sha256:
        raise ArtifactError(f"{weights} does not match the weights_sha256 of {CARD_FILE} "
                            "(file replaced or corrupted)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {err}") from err


def _split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_artifact(path: str | Path, *, verify_hash: bool = True, load_heads: bool = True) -> Artifact:
    """Load and validate an artifact; the backbone and heads are returned in eval mode on CPU.

    Raises:
        ArtifactError: missing files, invalid card, hash mismatch, or tensors that do not fit the card.
    """
    root = Path(path)
    card = read_card(root)
    tensors = _read_weights(root, card, verify_hash)
    backbone = DinoVisionTransformer(card.architecture)
    try:
        state = _split_prefix(tensors, "backbone")
        check_state_dict(state, backbone.state_dict())
        backbone.load_state_dict(state)
        heads = {}
        if load_heads:
            for name, head_cfg in card.heads.items():
                head = DINOHead(head_cfg)
                head_state = _split_prefix(tensors, name)
                check_state_dict(head_state, head.state_dict())
                head.load_state_dict(head_state)
                heads[name] = head.eval()
    except CheckpointError as err:
        raise ArtifactError(f"artifact {root}: {err}") from err
    return Artifact(path=root, card=card, backbone=backbone.eval(), heads=heads)


def validate_artifact(path: str | Path) -> ModelCard:
    """Fully load an artifact (hash, card, tensor shapes) and return its card; raises on any problem."""
    return load_artifact(path).card
