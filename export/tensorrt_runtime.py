"""The parts of the TensorRT integration that need ``tensorrt`` and a GPU: building engines, checking them.

Every function takes the ``tensorrt`` module (from :func:`dinoforge.core.tensorrt.import_tensorrt`) as an
argument, so importing this module needs neither. Engines run through :mod:`dinoforge.core.tensorrt`, the
code the serving backend runs them with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinoforge.core.fileio import atomic_write_bytes
from dinoforge.core.onnx_contract import EMBEDDING_OUTPUTS
from dinoforge.core.ort_session import create_session
from dinoforge.core.tensorrt import execute, load_engine
from dinoforge.export.errors import ExportError

log = logging.getLogger(__name__)
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes of one input."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _network_flags(trt: Any) -> int:
    # TensorRT 10: strong typing is opt-in; TensorRT 11: always on and the flag is deprecated (ignored).
    major = int(trt.__version__.split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if (flag is not None and major < 11) else 0


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any) -> Any:
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def build_serialized(trt: Any, onnx_path: Path, profiles: list[Profile], workspace_mb: int,
                     timing_cache_path: Path) -> bytes:
    """Parse the graph into a strongly typed network and build a serialized engine (timing cache persisted)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: never reuse a foreign cache
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    atomic_write_bytes(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def run_engine(trt: Any, engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once on host arrays (on the current CUDA device); every output as float32."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    engine = load_engine(trt, engine_path)
    inputs = {name: torch.from_numpy(np.ascontiguousarray(array)).to(device) for name, array in feeds.items()}
    try:
        outputs = execute(trt, engine, engine.create_execution_context(), inputs, device)
    except RuntimeError as err:
        raise ExportError(f"TensorRT execution of {engine_path} failed: {err}") from err
    return {name: t.float().cpu().numpy() for name, t in outputs.items()}


def parity_vs_onnxruntime(trt: Any, engine_path: Path, onnx_path: Path, profiles: list[Profile],
                          min_cosine: float, seed: int = 0) -> dict[str, Any]:
    """Cosine of the engine's embeddings vs ONNX Runtime on one max-size batch of random valid inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    session = create_session(onnx_path)
    for p, meta in zip(profiles, session.get_inputs(), strict=True):
        shape = p.opt
        feeds[p.name] = rng.integers(0, 256, shape, dtype=np.uint8) if meta.type == "tensor(uint8)" \
            else rng.standard_normal(shape).astype(np.float32)
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    ours = run_engine(trt, engine_path, feeds)
    report: dict[str, Any] = {"min_cosine_threshold": min_cosine, "batch": profiles[0].opt[0]}
    for name in EMBEDDING_OUTPUTS:
        a, b = ours[name].astype(np.float64), reference[name].astype(np.float64)
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        report[name] = {"min_cosine": float(cos.min()), "max_abs_error": float(np.abs(a - b).max())}
    report["passed"] = all(report[n]["min_cosine"] >= min_cosine for n in EMBEDDING_OUTPUTS)
    return report
