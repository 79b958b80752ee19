"""``dinoforge export tensorrt``: a TensorRT engine from an exported ONNX graph, named by a cache key.

Written against the documented TensorRT Python API of versions 10 and 11:

* the network is **strongly typed** (precision comes from the ONNX types: an fp16 graph gives an fp16 engine);
  TensorRT 10 needs the ``STRONGLY_TYPED`` creation flag, TensorRT 11 is always strongly typed and deprecates
  the flag, and no ``BuilderFlag.FP16``/``INT8`` is ever set (TensorRT 11 removed them);
* one optimisation profile covers the batch range ``min/opt/max``; every other axis is fixed by the graph;
* a persistent timing cache is loaded from and saved to ``OUT/timing.cache``;
* the engine file is ``OUT/<stem>-<key16>.plan`` where the key hashes the ONNX sha256, TensorRT version, GPU
  compute capability, precision and profile, so an engine built for anything else is never picked up.

``tensorrt`` (and a CUDA GPU) are not available on the development machine: the key/profile logic is tested
here, the build and run paths only where TensorRT is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import ArtifactError, MissingDependencyError
from dinoforge.core.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from dinoforge.core.onnx_contract import (ENGINE_SOURCE_KEY, engine_description, engine_filename,
                                          read_export_metadata)
from dinoforge.core.tensorrt import import_tensorrt
from dinoforge.export import tensorrt_runtime as rt
from dinoforge.export.errors import ExportError
from dinoforge.export.tensorrt_runtime import Profile

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"


class TensorRTBuildConfig(StrictModel):
    """Engine build options."""

    min_batch: int = Field(1, gt=0)
    opt_batch: int = Field(8, gt=0)
    max_batch: int = Field(32, gt=0)
    workspace_mb: int = Field(4096, gt=0)
    min_cosine: float | None = Field(None, description="parity vs ONNX Runtime; default by precision")
    parity: bool = True

    @model_validator(mode="after")
    def _order(self) -> TensorRTBuildConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}/{self.opt_batch}/"
                             f"{self.max_batch}")
        return self


def input_profiles(model: onnx.ModelProto, cfg: TensorRTBuildConfig) -> list[Profile]:
    """Optimisation-profile shapes for every graph input: the batch axis spans the config, others are fixed.

    Raises:
        ExportError: an input with unknown rank or a dynamic non-batch axis (run ``check-trt``).
    """
    inits = {t.name for t in model.graph.initializer}
    profiles = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ExportError(f"input {value.name!r} has no static rank; cannot build a profile")
        fixed = []
        for axis, dim in enumerate(dims[1:], start=1):
            if not dim.dim_value:
                raise ExportError(f"input {value.name!r} axis {axis} is dynamic; only the batch axis may be")
            fixed.append(dim.dim_value)
        if dims[0].dim_value and dims[0].dim_value not in (cfg.min_batch, cfg.max_batch):
            raise ExportError(f"input {value.name!r} has a fixed batch of {dims[0].dim_value}; export with a "
                              "dynamic batch axis")
        profiles.append(Profile(value.name, (cfg.min_batch, *fixed), (cfg.opt_batch, *fixed),
                                (cfg.max_batch, *fixed)))
    return profiles


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (``-1`` for dynamic) of the graph inputs and outputs."""
    inits = {t.name for t in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type),
                "shape": [d.dim_value if d.dim_value else -1 for d in tensor.shape.dim]}

    return {"inputs": [describe(v) for v in model.graph.input if v.name not in inits],
            "outputs": [describe(v) for v in model.graph.output]}


def graph_precision(model: onnx.ModelProto) -> str:
    """Precision recorded by ``dinoforge export onnx`` (or inferred: Q/DQ -> int8, fp16 weights -> fp16)."""
    try:
        return str(read_export_metadata(model)["export"]["precision"])
    except ArtifactError:  # not a dinoforge export: infer from the graph
        ops = {n.op_type for n in model.graph.node}
        if "QuantizeLinear" in ops:
            return "int8"
        halves = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        return "fp16" if halves else "fp32"


def cache_key(*, onnx_sha256: str, trt_version: str, compute_capability: str, precision: str,
              profiles: list[Profile]) -> str:
    """Hex sha256 identifying an engine; any change of input, toolchain, GPU or profile changes it."""
    payload = {"onnx_sha256": onnx_sha256, "tensorrt": trt_version, "compute_capability": compute_capability,
               "precision": precision, "profiles": [p.as_dict() for p in profiles]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_path(out_dir: Path, onnx_path: Path, key: str) -> Path:
    """``OUT/<onnx stem>-<first 16 hex of key>.plan``."""
    return out_dir / engine_filename(onnx_path, key)


def compute_capability() -> str:
    """``"major.minor"`` of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT engines need a CUDA GPU; torch sees none")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


@dataclass
class BuildResult:
    """Where the engine is and whether it was reused from the cache."""

    engine_path: Path
    key: str
    reused: bool
    parity: dict[str, Any] | None


def build_engine(onnx_path: str | Path, out_dir: str | Path, cfg: TensorRTBuildConfig) -> BuildResult:
    """Build (or reuse) the engine of an ONNX graph and check its parity against ONNX Runtime.

    Raises:
        MissingDependencyError: no ``tensorrt`` or no GPU.
        ExportError: a graph that fails check-trt, unreadable graph, unprofilable shapes, parser/builder failure,
            parity failure.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} does not exist")
    model = onnx.load(str(onnx_path))
    from dinoforge.export.trt_lint import lint_model

    errors = [str(f) for f in lint_model(model) if f.severity == "error"]
    if errors:  # fail before a long build with the parser's terser message
        raise ExportError(f"{onnx_path} fails `dinoforge export check-trt`:\n  " + "\n  ".join(errors[:20]))
    profiles = input_profiles(model, cfg)
    trt = import_tensorrt()
    precision = graph_precision(model)
    key = cache_key(onnx_sha256=sha256_file(onnx_path), trt_version=trt.__version__,
                    compute_capability=compute_capability(), precision=precision, profiles=profiles)
    path = engine_path(out_dir, onnx_path, key)
    reused = path.is_file()
    if not reused:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine = rt.build_serialized(trt, onnx_path, profiles, cfg.workspace_mb, out_dir / TIMING_CACHE)
        atomic_write_bytes(path, engine)
        atomic_write_json(engine_description(path), {
            "key": key, ENGINE_SOURCE_KEY: onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
            "tensorrt": trt.__version__, "compute_capability": compute_capability(), "precision": precision,
            "profiles": [p.as_dict() for p in profiles], "io": graph_io(model)})
    parity = None
    if cfg.parity:
        threshold = cfg.min_cosine if cfg.min_cosine is not None else \
            {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}[precision]
        parity = rt.parity_vs_onnxruntime(trt, path, onnx_path, profiles, threshold)
        if not parity["passed"]:
            if not reused:
                path.unlink(missing_ok=True)
                engine_description(path).unlink(missing_ok=True)
            raise ExportError(f"TensorRT engine misses parity vs ONNX Runtime: {parity}")
    return BuildResult(path, key, reused, parity)
