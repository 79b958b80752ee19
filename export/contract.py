"""The ONNX I/O contract of every dinoforge export (documented in ``docs/export.md``).

Serving code (ONNX Runtime, TensorRT and Triton backends) relies on these names; change them only together
with ``docs/export.md`` and a format-version bump.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from dinoforge.core.errors import ConfigError, DinoforgeError

EXPORT_FORMAT_VERSION = 1
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

#: Input of a graph fed normalised float pixels, ``[batch, 3, H, W]`` float32.
INPUT_NAME = "pixel_values"
#: Input of a graph with embedded preprocessing, ``[batch, H, W, 3]`` uint8 RGB.
RAW_INPUT_NAME = "pixels"
BATCH_DIM = "batch"
CLS_OUTPUT = "cls_embedding"  # [batch, D]
MEAN_OUTPUT = "mean_embedding"  # [batch, D]
PATCH_OUTPUT = "patch_tokens"  # [batch, h*w, D]
EMBEDDING_OUTPUTS: tuple[str, ...] = (CLS_OUTPUT, MEAN_OUTPUT)

META_CARD = "dinoforge.model_card"
META_EXPORT = "dinoforge.export"
META_RESOLUTION = "dinoforge.resolution"
META_PRECISION = "dinoforge.precision"
META_LAYOUT = "dinoforge.input_layout"

MANIFEST_FILE = "export.json"
PARITY_FILE = "parity.json"
CARD_COPY = "model.json"

_RES_RE = re.compile(r"^\s*(\d+)(?:\s*[xX]\s*(\d+))?\s*$")


class ExportError(DinoforgeError):
    """An export cannot be produced from the given input (graph, options or environment)."""


class ParityFailure(DinoforgeError):
    """An exported graph missed a parity threshold; nothing was written."""

    exit_code = 1


def parse_resolutions(text: str, patch_size: int) -> list[tuple[int, int]]:
    """Parse ``"224,448"`` or ``"224x336"`` into ``[(H, W), ...]``, each a multiple of the patch size.

    Raises:
        ConfigError: empty list, malformed entry, duplicate, or a side that is not a positive patch multiple.
    """
    out: list[tuple[int, int]] = []
    for item in text.split(","):
        match = _RES_RE.match(item)
        if not match:
            raise ConfigError(f"resolution {item.strip()!r} is not N or HxW (e.g. 224 or 224x336)")
        h = int(match.group(1))
        w = int(match.group(2) or h)
        for side in (h, w):
            if side <= 0 or side % patch_size:
                raise ConfigError(f"resolution {item.strip()}: {side} is not a positive multiple of the "
                                  f"patch size {patch_size}")
        if (h, w) in out:
            raise ConfigError(f"resolution {h}x{w} is listed twice")
        out.append((h, w))
    return out


def resolution_tag(hw: tuple[int, int]) -> str:
    """``(224, 224)`` -> ``"224"``; ``(224, 336)`` -> ``"224x336"`` (used in file names)."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def graph_filename(hw: tuple[int, int]) -> str:
    """File name of the graph for one resolution inside an export directory."""
    return f"model_{resolution_tag(hw)}.onnx"


def read_export_metadata(model: str | Path | Any) -> dict[str, Any]:
    """Parse the dinoforge metadata of an exported graph.

    Args:
        model: path of an ``.onnx`` file or an ``onnx.ModelProto``.

    Returns:
        ``{"export": {...}, "model_card": {...}}`` plus the flat keys as strings.

    Raises:
        ExportError: the graph carries no dinoforge metadata.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    props = {p.key: p.value for p in proto.metadata_props}
    if META_EXPORT not in props:
        raise ExportError(f"{model if isinstance(model, (str, Path)) else 'graph'} has no {META_EXPORT} "
                          "metadata (not exported by dinoforge)")
    out: dict[str, Any] = {k: v for k, v in props.items() if k not in (META_EXPORT, META_CARD)}
    out["export"] = json.loads(props[META_EXPORT])
    out["model_card"] = json.loads(props[META_CARD]) if META_CARD in props else None
    return out
