"""What ``--model`` names for evaluation: an artifact, a checkpoint file, or the raw-pixel baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dinoforge.core.config import apply_overrides, build_config
from dinoforge.core.errors import CheckpointError
from dinoforge.core.eval.features import Autocast, BackboneExtractor, FeatureExtractor, PixelExtractor
from dinoforge.core.pooling import check_poolings
from dinoforge.core.preprocess import PreprocessConfig

PIXELS = "pixels"
#: Raw-pixel contract: resize to 28x28 (native Fashion-MNIST size), values in [0, 1] (mean 0, std 1).
PIXEL_CONTRACT = PreprocessConfig(mode="resize", size=28, resize_size=None, interpolation="bilinear",
                                  mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), patch_size=1)


@dataclass
class EvalModel:
    """An extractor with the preprocessing contract its features are computed at."""

    extractor: FeatureExtractor
    preprocess: PreprocessConfig
    name: str
    kind: Literal["artifact", "checkpoint", "pixels"]
    sha256: str | None = None
    path: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of the model."""
        info: dict[str, Any] = {"name": self.name, "kind": self.kind, "sha256": self.sha256, "path": self.path}
        backbone = getattr(self.extractor, "backbone", None)
        if backbone is not None:
            info["architecture"] = backbone.config.model_dump(mode="json")
            info["num_parameters"] = sum(p.numel() for p in backbone.parameters())
        return info


def _with_overrides(base: PreprocessConfig, overrides: Sequence[str]) -> PreprocessConfig:
    if not overrides:
        return base
    return build_config(PreprocessConfig, apply_overrides(base.model_dump(), list(overrides)),
                        source="--preprocess")


def load_eval_model(spec: str | Path, *, poolings: Sequence[str] = ("cls",), device: str = "cpu",
                    autocast: Autocast = None, preprocess_overrides: Sequence[str] = ()) -> EvalModel:
    """Open ``spec`` for feature extraction.

    Args:
        spec: an artifact directory, an official/timm/safetensors checkpoint file, or ``pixels``.
        poolings: backbone poolings to compute (ignored for ``pixels``).
        device: where the forward pass runs.
        autocast: ``bf16``/``fp16`` mixed precision, or ``None``.
        preprocess_overrides: ``key=value`` changes to the model's contract (e.g. ``size=28``).

    Raises:
        CheckpointError / ArtifactError: the path is not a loadable model.
        ConfigError: invalid pooling, device, autocast or override.
    """
    from dinoforge.core.artifact import is_artifact, load_artifact
    from dinoforge.core.checkpoint import load_backbone

    check_poolings(poolings)  # also for pixels: a misspelt pooling is an error, not silently ignored
    if str(spec) == PIXELS:
        return EvalModel(PixelExtractor(), _with_overrides(PIXEL_CONTRACT, preprocess_overrides), "raw pixels",
                         "pixels")
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {spec} does not exist (give an artifact directory, a checkpoint file, "
                              f"or '{PIXELS}')")
    if path.is_dir() and is_artifact(path):
        art = load_artifact(path, load_heads=False)
        extractor = BackboneExtractor(art.backbone, poolings, device=device, autocast=autocast)
        return EvalModel(extractor, _with_overrides(art.card.preprocessing, preprocess_overrides), art.card.name,
                         "artifact", art.sha256, str(path))
    loaded = load_backbone(path)
    # A bare checkpoint carries no contract: use the DINOv2 evaluation one (resize 256, centre-crop 224).
    base = PreprocessConfig(patch_size=loaded.backbone.config.patch_size)
    extractor = BackboneExtractor(loaded.backbone, poolings, device=device, autocast=autocast)
    return EvalModel(extractor, _with_overrides(base, preprocess_overrides), path.name,
                     "checkpoint", loaded.sha256, str(path))
