"""check-trt: every rule fires on a graph built to violate it, and dinoforge exports pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dinoforge.core.cli import main
from dinoforge.export.trt_lint import lint_model


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto] = (), opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _x(shape: list[object], elem: int = TensorProto.FLOAT, name: str = "x") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _y() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, None)


def _rules(model: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in lint_model(model):
        out.setdefault(f.rule, []).append(f.node)
    return out


def test_clean_graph_passes() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    assert lint_model(_model([node], [_x(["batch", 3])], [_y()])) == []


def test_unsupported_unknown_and_custom_ops() -> None:
    nodes = [helper.make_node("MatMulInteger", ["x", "x"], ["a"], name="mmi"),
             helper.make_node("FancyOp", ["a"], ["b"], name="fancy"),
             helper.make_node("Gelu", ["b"], ["y"], name="ms_gelu", domain="com.microsoft")]
    rules = _rules(_model(nodes, [_x(["batch", 4])], [_y()]))
    assert rules["unsupported-op"] == ["mmi"] and rules["unknown-op"] == ["fancy"]
    assert rules["custom-domain"] == ["ms_gelu"]


def test_resize_rules() -> None:
    roi, scales = numpy_helper.from_array(np.zeros(0, np.float32), "roi"), \
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["a"], name="aa", mode="cubic", antialias=1),
             helper.make_node("Resize", ["a", "roi", "scales"], ["b"], name="coord", mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize"),
             helper.make_node("Resize", ["b", "roi", "scales"], ["y"], name="ok", mode="linear")]
    rules = _rules(_model(nodes, [_x(["batch", 3, 8, 8])], [_y()], [roi, scales]))
    assert rules == {"resize-antialias": ["aa"], "resize-mode": ["coord"]}


def test_qdq_zero_points() -> None:
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp_u8 = numpy_helper.from_array(np.array(128, np.uint8), "zu")
    zp_i8 = numpy_helper.from_array(np.array(3, np.int8), "zi")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z0")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["q"], name="q_u8"),
             helper.make_node("DequantizeLinear", ["q", "s", "zu"], ["d"], name="dq_u8"),
             helper.make_node("QuantizeLinear", ["d", "s", "zi"], ["q2"], name="q_asym"),
             helper.make_node("DequantizeLinear", ["q2", "s", "zi"], ["d2"], name="dq_asym"),
             helper.make_node("QuantizeLinear", ["d2", "s", "z0"], ["q3"], name="q_ok"),
             helper.make_node("DequantizeLinear", ["q3", "s", "z0"], ["y"], name="dq_ok")]
    rules = _rules(_model(nodes, [_x(["batch", 4])], [_y()], [scale, zp_u8, zp_i8, zero]))
    assert rules == {"qdq-type": ["q_u8", "dq_u8"], "qdq-zero-point": ["q_asym", "dq_asym"]}


def test_non_constant_axes() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Slice", ["shape", "starts", "ends", "shape"], ["axes"], name="make_axes"),
             helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")]
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1], np.int64), "ends")
    rules = _rules(_model(nodes, [_x(["batch", 4])], [_y()], [starts, ends]))
    assert rules == {"non-constant-axes": ["make_axes", "unsq"]}


def test_dynamic_shapes_and_types() -> None:
    node = helper.make_node("Add", ["x", "z"], ["y"], name="add")
    unranked = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    model = _model([node], [_x(["batch", 3, "h", None])], [_y()])
    model.graph.input.append(unranked)
    findings = {(f.rule, f.node, f.message.split(";")[0]) for f in lint_model(model)}
    assert ("dynamic-dim", "x", "axis 2 is dynamic ('h')") in findings
    assert ("dynamic-dim", "x", "axis 3 is dynamic (unnamed)") in findings
    assert ("dynamic-rank", "z", "input has unknown rank") in findings
    doubles = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_x([1, 2], TensorProto.DOUBLE)], [_y()],
                     [numpy_helper.from_array(np.zeros(2, np.float64), "w")])
    assert {(f.rule, f.severity) for f in lint_model(doubles)} == {("dtype", "warning")}


@pytest.mark.parametrize("opset", [8, 23])
def test_opset_range(opset: int) -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_x([1])], [_y()], opset=opset)
    assert _rules(model) == {"opset": ["<model>"]}


def test_cli_on_exports(tiny_export: Path, tiny_reg_raw_export: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    for path in (tiny_export / "model_84.onnx", tiny_reg_raw_export / "model_84.onnx"):
        assert main(["export", "check-trt", str(path)]) == 0
        assert "0 error(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    onnx.save(_model([helper.make_node("QLinearMatMul", ["x"], ["y"], name="qlm")], [_x([1])], [_y()]), str(bad))
    assert main(["export", "check-trt", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["node"] == "qlm"
    assert main(["export", "check-trt", str(tmp_path / "missing.onnx")]) == 2
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a model")
    assert main(["export", "check-trt", str(tmp_path / "garbage.onnx")]) == 2
