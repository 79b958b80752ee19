"""The model card (``model.json``): what every stage and every runtime knows about a model, without torch.

Reading a card needs pydantic only, so the torch-free edge runtime validates the card an ONNX export carries
with the very class that wrote it. Loading and saving the weights is :mod:`dinoforge.core.artifact`.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from dinoforge.core import __version__
from dinoforge.core.backbone.config import BackboneConfig, HeadConfig
from dinoforge.core.config import StrictModel, format_validation_error
from dinoforge.core.errors import ArtifactError
from dinoforge.core.image_contract import PreprocessConfig
from dinoforge.core.pooling import Pooling

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


class Provenance(StrictModel):
    """Where an artifact came from."""

    source: str = Field(..., description="random-init, official-pth, timm, pretrain, distill, ...")
    parent_sha256: str | None = Field(None, description="weights_sha256 of the artifact this was made from")
    parent: str | None = Field(None, description="human-readable pointer to the parent (path or name)")
    recipe: str | None = None
    data_manifest_sha256: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    dinoforge_version: str = __version__
    details: dict[str, Any] = Field(default_factory=dict)


class ModelCard(StrictModel):
    """The ``model.json`` of an artifact."""

    format_version: int = FORMAT_VERSION
    name: str
    architecture: BackboneConfig
    embed_dim: int
    embedding_dims: dict[str, int]
    default_pooling: Pooling = "cls"
    preprocessing: PreprocessConfig
    heads: dict[str, HeadConfig] = Field(default_factory=dict)
    provenance: Provenance
    num_parameters: int
    weights_sha256: str


def embedding_dims(dim: int) -> dict[str, int]:
    """Output width per pooling mode."""
    return {"cls": dim, "mean": dim, "cls+mean": 2 * dim}


def read_card(path: str | Path) -> ModelCard:
    """Read and validate ``model.json`` of an artifact directory (weights are not touched)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory (expected a folder with {CARD_FILE} "
                            f"and {WEIGHTS_FILE})")
    card_path = root / CARD_FILE
    if not card_path.is_file():
        raise ArtifactError(f"artifact {root} has no {CARD_FILE}")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{card_path} is not valid JSON: {err}") from err
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ArtifactError(f"{card_path} has format_version {data['format_version']}; this dinoforge "
                            f"({__version__}) reads up to {FORMAT_VERSION}")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(format_validation_error(err, str(card_path))) from None


def is_artifact(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a ``model.json``."""
    return (Path(path) / CARD_FILE).is_file()
