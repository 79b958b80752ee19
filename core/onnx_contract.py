"""The hand-over between ``dinoforge export`` and serving: graph I/O names, metadata keys, file layout.

``export`` writes graphs, export folders, TensorRT engines and Triton models in this format; the ONNX Runtime,
TensorRT and Triton serving backends read it. Both sides import the names from here, so they cannot drift
apart. Documented in ``docs/export.md``; change a name only together with that page and a bump of
:data:`EXPORT_FORMAT_VERSION`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from dinoforge.core.card import ModelCard
from dinoforge.core.config import format_validation_error
from dinoforge.core.errors import ArtifactError, ConfigError

EXPORT_FORMAT_VERSION = 1
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

# ---------------------------------------------------------------------------------------------- graph I/O
#: Input of a graph fed normalised float pixels, ``[batch, 3, H, W]`` float32.
INPUT_NAME = "pixel_values"
#: Input of a graph with embedded preprocessing, ``[batch, H, W, 3]`` uint8 RGB.
RAW_INPUT_NAME = "pixels"
BATCH_DIM = "batch"
CLS_OUTPUT = "cls_embedding"  # [batch, D]
MEAN_OUTPUT = "mean_embedding"  # [batch, D]
PATCH_OUTPUT = "patch_tokens"  # [batch, h*w, D]
EMBEDDING_OUTPUTS: tuple[str, ...] = (CLS_OUTPUT, MEAN_OUTPUT)

# ------------------------------------------------------------------------------- graph metadata_props keys
META_CARD = "dinoforge.model_card"  # the artifact's model.json
META_EXPORT = "dinoforge.export"  # JSON: resolution, input_name, input_dtype, outputs, precision, ...
META_RESOLUTION = "dinoforge.resolution"
META_PRECISION = "dinoforge.precision"
META_LAYOUT = "dinoforge.input_layout"

# ------------------------------------------------------------------------------------------- file layout
#: Files of an export folder beside its ``model_<resolution>.onnx`` graphs.
MANIFEST_FILE = "export.json"
PARITY_FILE = "parity.json"
CARD_COPY = "model.json"
#: A TensorRT engine ``X.plan`` is described by ``X.json`` (:func:`engine_description`); this key names the
#: ONNX graph it was built from (relative to the engine's folder), whose metadata holds the model card.
ENGINE_SOURCE_KEY = "onnx"
#: The file of a Triton model version ``REPO/NAME/<version>/`` per Triton backend (the Python backend runs
#: the ``model.onnx`` beside its ``model.py``).
TRITON_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}
TRITON_GRAPH_FILE = TRITON_FILES["onnxruntime"]

_RES_RE = re.compile(r"^\s*(\d+)(?:\s*[xX]\s*(\d+))?\s*$")


def resolution_tag(hw: tuple[int, int]) -> str:
    """``(224, 224)`` -> ``"224"``; ``(224, 336)`` -> ``"224x336"`` (used in file names)."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def graph_filename(hw: tuple[int, int]) -> str:
    """File name of the graph for one resolution inside an export folder (matches :data:`GRAPH_GLOB`)."""
    return f"model_{resolution_tag(hw)}.onnx"


GRAPH_GLOB = "model_*.onnx"


def engine_filename(onnx_path: Path, key: str) -> str:
    """``<graph stem>-<first 16 hex of the build key>.plan``: the engine of a graph, named by what built it."""
    return f"{onnx_path.stem}-{key[:16]}.plan"


def engine_glob(onnx_path: Path) -> str:
    """Glob of the engines built from one graph (matches :func:`engine_filename`)."""
    return f"{onnx_path.stem}-*.plan"


def engine_description(engine: Path) -> Path:
    """The JSON file describing an engine (build key, source graph, profiles, I/O), beside it."""
    return engine.with_suffix(".json")


def parse_resolutions(text: str, patch_size: int) -> list[tuple[int, int]]:
    """Parse ``"224,448"`` or ``"224x336"`` (the notation of :func:`resolution_tag`) into ``[(H, W), ...]``.

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


def graph_metadata(model: str | Path | Any) -> dict[str, str]:
    """The ``metadata_props`` of an ``.onnx`` file (weights not loaded) or of an ``onnx.ModelProto``."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return {p.key: p.value for p in proto.metadata_props}


def parse_export_metadata(props: Mapping[str, str], where: str) -> tuple[dict[str, Any], ModelCard]:
    """The export description (``META_EXPORT``) and the validated model card (``META_CARD``) of a graph.

    Args:
        props: the graph's metadata (:func:`graph_metadata`, or ONNX Runtime's ``custom_metadata_map``).
        where: names the graph in error messages.

    Raises:
        ArtifactError: keys missing (a graph not exported by dinoforge), malformed JSON or an invalid card.
    """
    if META_EXPORT not in props or META_CARD not in props:
        raise ArtifactError(f"{where} has no dinoforge export metadata ({META_EXPORT}, {META_CARD}); "
                            "export it with `dinoforge export onnx`")
    try:
        export = json.loads(props[META_EXPORT])
        card = ModelCard.model_validate(json.loads(props[META_CARD]))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{where}: dinoforge metadata is not valid JSON: {err}") from err
    except ValidationError as err:
        raise ArtifactError(format_validation_error(err, f"{where} {META_CARD}")) from None
    if not isinstance(export, dict):
        raise ArtifactError(f"{where}: {META_EXPORT} is not a JSON object")
    return export, card


def read_export_metadata(model: str | Path | Any) -> dict[str, Any]:
    """The dinoforge metadata of an exported graph, parsed.

    Args:
        model: path of an ``.onnx`` file or an ``onnx.ModelProto``.

    Returns:
        ``{"export": {...}, "model_card": {...}}`` (JSON as written) plus the flat keys
        (``dinoforge.resolution``, ...) as strings.

    Raises:
        ArtifactError: the graph carries no dinoforge metadata, or it is malformed.
    """
    props = graph_metadata(model)
    export, _ = parse_export_metadata(props, str(model) if isinstance(model, (str, Path)) else "graph")
    out: dict[str, Any] = {k: v for k, v in props.items() if k not in (META_EXPORT, META_CARD)}
    out["export"] = export
    out["model_card"] = json.loads(props[META_CARD])  # as written (validated above)
    return out
