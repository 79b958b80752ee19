"""``dinoforge export check-trt``: lint an ONNX graph against TensorRT's ONNX operator support.

Each rule returns :class:`Finding` objects naming the offending node (or tensor). Errors are what the
TensorRT ONNX parser or builder rejects; warnings are accepted with a loss (e.g. DOUBLE cast down).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
from onnx import helper

from dinoforge.export import trt_ops
from dinoforge.export.errors import ExportError

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One lint result."""

    rule: str
    severity: Severity
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"rule": self.rule, "severity": self.severity, "node": self.node, "message": self.message}


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed {node.op_type} -> {', '.join(node.output)}>"


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(model: onnx.ModelProto) -> Iterator[Finding]:
    """The default-domain opset must be within the parser's range."""
    version = _opset(model)
    if version is None or not trt_ops.MIN_OPSET <= version <= trt_ops.MAX_OPSET:
        yield Finding("opset", "error", "<model>", f"opset {version} is outside TensorRT's supported range "
                      f"{trt_ops.MIN_OPSET}-{trt_ops.MAX_OPSET}")


def check_ops(model: onnx.ModelProto) -> Iterator[Finding]:
    """Every node must be a supported ``ai.onnx`` op (custom domains need a plugin)."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            yield Finding("custom-domain", "error", _name(node), f"{node.domain}::{node.op_type} is not an ONNX "
                          "standard op; TensorRT needs a plugin for it")
        elif node.op_type in trt_ops.UNSUPPORTED_OPS:
            yield Finding("unsupported-op", "error", _name(node), f"{node.op_type} is not supported by TensorRT")
        elif node.op_type not in trt_ops.SUPPORTED_OPS:
            yield Finding("unknown-op", "error", _name(node), f"{node.op_type} is not in TensorRT's ONNX "
                          "operator support matrix")


def check_resize(model: onnx.ModelProto) -> Iterator[Finding]:
    """Resize: no antialias, supported mode / coordinate transform, stretch aspect policy."""
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("antialias", 0):
            yield Finding("resize-antialias", "error", _name(node), "antialiased Resize is not supported by "
                          "TensorRT (bake the resampled tensor or use explicit matrices)")
        mode = attrs.get("mode", b"nearest").decode()
        if mode not in trt_ops.RESIZE_MODES:
            yield Finding("resize-mode", "error", _name(node), f"Resize mode {mode!r} is not supported")
        coord = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
        if coord not in trt_ops.RESIZE_COORD_MODES:
            yield Finding("resize-mode", "error", _name(node), f"coordinate_transformation_mode {coord!r} "
                          "is not supported")
        policy = attrs.get("keep_aspect_ratio_policy", b"stretch").decode()
        if policy != "stretch":
            yield Finding("resize-mode", "error", _name(node), f"keep_aspect_ratio_policy {policy!r} is not "
                          "supported (only stretch)")


def _zero_point_nonzero(graph: onnx.GraphProto, name: str) -> bool | None:
    for init in graph.initializer:
        if init.name == name:
            return bool(onnx.numpy_helper.to_array(init).any())
    return None


def check_qdq(model: onnx.ModelProto) -> Iterator[Finding]:
    """Q/DQ nodes: zero points must be 0 (symmetric) and of int8 type."""
    graph = model.graph
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = node.input[2]
        dtype = next((t.data_type for t in graph.initializer if t.name == zp), None)
        if dtype == onnx.TensorProto.UINT8:
            yield Finding("qdq-type", "error", _name(node), "uint8 quantization is not supported by TensorRT "
                          "(export with --int8-scheme tensorrt)")
        elif _zero_point_nonzero(graph, zp):
            yield Finding("qdq-zero-point", "error", _name(node), "non-zero zero point; TensorRT needs "
                          "symmetric quantization")


def check_constant_axes(model: onnx.ModelProto) -> Iterator[Finding]:
    """Slice/Squeeze/Unsqueeze ``axes`` must be constants."""
    consts = _constants(model.graph)
    for node in model.graph.node:
        if node.op_type in trt_ops.CONSTANT_AXES_OPS:
            index = 3 if node.op_type == "Slice" else 1
            if len(node.input) > index and node.input[index] and node.input[index] not in consts:
                yield Finding("non-constant-axes", "error", _name(node), f"{node.op_type} axes input "
                              f"{node.input[index]!r} is computed at run time; TensorRT needs a constant")


def check_shapes(model: onnx.ModelProto) -> Iterator[Finding]:
    """Inputs must have a known rank and only the batch axis (0) may be dynamic, named, for a batch profile."""
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            yield Finding("dynamic-rank", "error", value.name, "input has unknown rank; TensorRT cannot build "
                          "an optimisation profile for it")
            continue
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0 and dim.dim_param:
                continue
            what = f"'{dim.dim_param}'" if dim.dim_param else "unnamed"
            yield Finding("dynamic-dim", "error", value.name, f"axis {axis} is dynamic ({what}); only a named "
                          "batch axis 0 can be profiled (export one graph per resolution)")
        elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if elem not in trt_ops.SUPPORTED_DTYPES:
            yield Finding("dtype", "warning" if elem == "DOUBLE" else "error", value.name,
                          f"input type {elem} is not a TensorRT type")


def check_initializer_types(model: onnx.ModelProto) -> Iterator[Finding]:
    """DOUBLE weights are cast down to float by the parser."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            yield Finding("dtype", "warning", init.name, "DOUBLE initializer will be cast to FLOAT")


RULES: tuple[Callable[[onnx.ModelProto], Iterator[Finding]], ...] = (
    check_opset, check_ops, check_resize, check_qdq, check_constant_axes, check_shapes, check_initializer_types)


def lint_model(model: onnx.ModelProto) -> list[Finding]:
    """Run every rule on an in-memory graph."""
    return [finding for rule in RULES for finding in rule(model)]


def lint_onnx(path: str | Path) -> list[Finding]:
    """Run every rule on an ONNX file.

    Raises:
        ExportError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf raises several unrelated types on garbage
        raise ExportError(f"{path} is not a readable ONNX model: {err}") from err
    return lint_model(model)
