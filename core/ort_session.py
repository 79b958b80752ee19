"""How dinoforge opens an ONNX Runtime session: one place for the options every caller shares.

Every session (the server's ONNX Runtime backend, export parity, k-NN evaluation of a graph, an ONNX teacher,
the benches) comes from :func:`create_session`, so a graph is timed and checked as it is served.

The one departure from ONNX Runtime's defaults, and why: on the CPU provider its ``SkipLayerNormFusion`` is
switched off. That optimizer rewrites each residual ``Add`` + ``LayerNormalization`` into one
``SkipLayerNormalization``, whose CPU kernel (onnxruntime 1.32) is slower than the two operators it replaces:
on ``[8, 50, 192]`` float32 with 2 threads, 180-230 us against 66-81 us for ``Add`` + ``Add`` (bias) +
``LayerNormalization`` (docs/edge.md). GPU providers keep the fusion: their fused kernel is the fast one.
Numerics are unchanged either way (same operations in the same order up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinoforge.core.errors import MissingDependencyError

CPU_PROVIDERS = ("CPUExecutionProvider",)
#: ONNX Runtime graph optimizers left out of CPU-only sessions (module docstring).
CPU_DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)


def disabled_optimizers(providers: Sequence[str]) -> list[str]:
    """The optimizers to switch off for a session on ``providers`` (only CPU: :data:`CPU_DISABLED_OPTIMIZERS`)."""
    return list(CPU_DISABLED_OPTIMIZERS) if tuple(providers) == CPU_PROVIDERS else []


def create_session(model: str | Path | bytes, *, threads: int = 0, providers: Sequence[str] | None = None,
                   optimized_model_path: str | Path | None = None, skip_layer_norm_fusion: bool | None = None,
                   profile_prefix: str | Path | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` with dinoforge's options.

    Args:
        model: an ``.onnx`` path or a serialized ``ModelProto``.
        threads: intra-op threads (0: ONNX Runtime's choice, one per core).
        providers: execution providers (default CPU only).
        optimized_model_path: also write the graph ONNX Runtime runs after its optimizers (for inspection).
        skip_layer_norm_fusion: force ``SkipLayerNormFusion`` on or off (default: off on CPU only; benches
            set it to time both).
        profile_prefix: record ONNX Runtime's per-node profile; ``session.end_profiling()`` writes it to a
            JSON file whose name starts with this prefix (benches: where the time goes).

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        Exception: ONNX Runtime's own error types for a file it cannot load (callers turn them into 4xx / exit 2).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingDependencyError("this needs `pip install onnxruntime` (or onnxruntime-gpu)") from err
    providers = list(providers or CPU_PROVIDERS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    disabled = disabled_optimizers(providers)
    if skip_layer_norm_fusion is not None:
        disabled = [] if skip_layer_norm_fusion else list(CPU_DISABLED_OPTIMIZERS)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
