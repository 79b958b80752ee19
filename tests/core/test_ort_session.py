"""dinoforge's ONNX Runtime sessions: CPU sessions keep residual Add + LayerNorm unfused, GPU ones fuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dinoforge.core.ort_session import create_session, disabled_optimizers

D = 16


def _residual_norm_graph() -> bytes:
    """``LayerNorm(x + (y + bias))``: the pattern ONNX Runtime's SkipLayerNormFusion rewrites."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), name) for name in ("g", "b", "bias")]
    nodes = [helper.make_node("Add", ["y", "bias"], ["t"]), helper.make_node("Add", ["x", "t"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["out"], axis=-1, epsilon=1e-6)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 5, D]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "residual_norm", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _optimized_ops(tmp_path: Path, **kwargs: object) -> tuple[set[str], np.ndarray]:
    path = tmp_path / "optimized.onnx"
    session = create_session(_residual_norm_graph(), threads=1, optimized_model_path=path, **kwargs)
    feeds = {n: np.random.default_rng(i).standard_normal((2, 5, D)).astype(np.float32)
             for i, n in enumerate(("x", "y"))}
    out = session.run(None, feeds)[0]  # [2, 5, D]
    return {n.op_type for n in onnx.load(str(path)).graph.node}, out


def test_cpu_sessions_keep_add_and_layer_norm(tmp_path) -> None:
    ops, plain = _optimized_ops(tmp_path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    fused_ops, fused = _optimized_ops(tmp_path, skip_layer_norm_fusion=True)  # what ONNX Runtime does by default
    assert "SkipLayerNormalization" in fused_ops
    np.testing.assert_allclose(plain, fused, rtol=0, atol=1e-5)  # same numbers either way


def test_only_cpu_only_sessions_switch_the_fusion_off() -> None:
    assert disabled_optimizers(["CPUExecutionProvider"]) == ["SkipLayerNormFusion"]
    assert disabled_optimizers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == []
    assert disabled_optimizers(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == []


def test_profile_prefix_records_every_node(tmp_path) -> None:
    """``profile_prefix``: ONNX Runtime's per-node trace lands in a file with that prefix."""
    session = create_session(_residual_norm_graph(), threads=1, profile_prefix=tmp_path / "trace")
    feeds = {n: np.zeros((1, 5, D), np.float32) for n in ("x", "y")}
    session.run(None, feeds)
    trace = Path(session.end_profiling())
    assert trace.parent == tmp_path and trace.name.startswith("trace")
    ops = {e["args"]["op_name"] for e in json.loads(trace.read_text()) if e.get("cat") == "Node"}
    assert "LayerNormalization" in ops
