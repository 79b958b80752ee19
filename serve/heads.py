"""Classification heads served by ``/v1/classify``: a k-NN gallery or a linear probe, bound to one model.

A head is a directory written atomically by ``dinoforge serve build-head``:

* ``head.json`` (:class:`HeadCard`): kind, class names, pooling, the model's ``weights_sha256``, k-NN
  ``k``/``temperature``, metrics measured when it was built, data it was built from;
* ``head.safetensors``: ``gallery [N, D]`` + ``labels [N]`` (k-NN, DINOv2 protocol: cosine, weights
  ``exp(sim / T)``), or ``weight [C, D]`` + ``bias [C]`` (linear probe on raw pooled features).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dinoforge.core.config import StrictModel, format_validation_error
from dinoforge.core.errors import ArtifactError
from dinoforge.core.fileio import atomic_directory, atomic_write_json
from dinoforge.core.pooling import Pooling

HEAD_CARD, HEAD_WEIGHTS = "head.json", "head.safetensors"
HEAD_FORMAT_VERSION = 1


class HeadCard(StrictModel):
    """``head.json``."""

    format_version: int = HEAD_FORMAT_VERSION
    kind: Literal["knn", "linear"]
    classes: list[str] = Field(..., min_length=1)
    pooling: Pooling
    feature_dim: int = Field(..., gt=0)
    model_sha256: str
    model_name: str = ""
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)
    num_samples: int = 0
    data: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


class ClassificationHead:
    """A loaded head.

    Args:
        card: its card.
        tensors: ``gallery``/``labels`` (k-NN) or ``weight``/``bias`` (linear).
    """

    def __init__(self, card: HeadCard, tensors: dict[str, torch.Tensor]) -> None:
        self.card = card
        need = {"knn": {"gallery", "labels"}, "linear": {"weight", "bias"}}[card.kind]
        if need - tensors.keys():
            raise ArtifactError(f"{card.kind} head is missing tensors {sorted(need - tensors.keys())}")
        self.tensors = {k: v for k, v in tensors.items() if k in need}
        width = tensors["gallery" if card.kind == "knn" else "weight"].shape[1]
        if width != card.feature_dim:
            raise ArtifactError(f"head tensors are {width} wide but head.json says feature_dim={card.feature_dim}")
        if card.kind == "linear" and tensors["weight"].shape[0] != len(card.classes):
            raise ArtifactError(f"linear head has {tensors['weight'].shape[0]} outputs for "
                                f"{len(card.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.card.classes)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores that sum to one per image.

        Args:
            features: ``[B, D]`` raw pooled features (pooling ``card.pooling``, not normalised).

        Returns:
            ``[B, C]``: k-NN vote shares (DINOv2 weighted votes, normalised) or linear-probe softmax.
        """
        x = features.float()
        if self.card.kind == "linear":
            logits = x @ self.tensors["weight"].T + self.tensors["bias"]  # [B, C]
            return logits.softmax(dim=-1)
        from dinoforge.core.eval import knn_class_scores

        k = self.card.k
        votes = knn_class_scores(self.tensors["gallery"], self.tensors["labels"], x, ks=(k,),
                                 temperature=self.card.temperature, num_classes=self.num_classes)
        v = next(iter(votes.values()))  # [B, C]
        return v / v.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def top_k(self, features: torch.Tensor | np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` ``(label, score)`` per image of ``features [B, D]`` (the server passes numpy)."""
        scores = self.scores(torch.as_tensor(features))
        values, indices = scores.topk(min(k, self.num_classes), dim=-1)  # [B, k]
        names = self.card.classes
        return [[(names[int(i)], float(v)) for v, i in zip(vrow, irow, strict=True)]
                for vrow, irow in zip(values, indices, strict=True)]

    def describe(self) -> dict[str, Any]:
        """Summary returned with every classification."""
        c = self.card
        out: dict[str, Any] = {"kind": c.kind, "pooling": c.pooling, "classes": len(c.classes)}
        if c.kind == "knn":
            out.update(k=c.k, temperature=c.temperature, gallery=int(self.tensors["gallery"].shape[0]))
        return out


def save_head(out_dir: str | Path, card: HeadCard, tensors: dict[str, torch.Tensor], *,
              overwrite: bool = False) -> Path:
    """Validate and write a head directory atomically."""
    ClassificationHead(card, tensors)  # refuse to write something that would not load
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as staging:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / HEAD_WEIGHTS))
            atomic_write_json(staging / HEAD_CARD, card.model_dump(mode="json"))
    except FileExistsError as err:
        raise ArtifactError(f"{out_dir} already exists; choose another --out or pass --overwrite") from err
    return Path(out_dir)


def load_head(path: str | Path) -> ClassificationHead:
    """Load a head directory; errors say which file is wrong."""
    root = Path(path)
    card_path, weights = root / HEAD_CARD, root / HEAD_WEIGHTS
    if not card_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{root} is not a classification head (expected {HEAD_CARD} and {HEAD_WEIGHTS}; "
                            "build one with `dinoforge serve build-head`)")
    try:
        data = json.loads(card_path.read_text())
        if isinstance(data, dict) and data.get("format_version", 1) > HEAD_FORMAT_VERSION:
            raise ArtifactError(f"{card_path} has format_version {data['format_version']}, newer than this "
                                f"dinoforge reads ({HEAD_FORMAT_VERSION})")
        card = HeadCard.model_validate(data)
        tensors = load_file(str(weights))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{card_path} is not valid JSON: {err}") from err
    except ValidationError as err:
        raise ArtifactError(format_validation_error(err, str(card_path))) from None
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {err}") from err
    return ClassificationHead(card, tensors)
