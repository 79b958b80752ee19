"""INT8: onnxruntime static quantization (QDQ), calibrated on real images.

Choices and why:

* QDQ format with per-channel symmetric int8 weights and one of two activation schemes:
  ``cpu`` (default) — asymmetric uint8 activations, the u8s8 kernels onnxruntime's x86 CPU provider is fast
  with (measured ~2x over fp32 on ViT-S/14, while s8s8 gave no speed-up on the same machine);
  ``tensorrt`` — symmetric int8 activations, every zero point 0, which TensorRT requires of Q/DQ nodes;
* only ``MatMul``/``Gemm`` nodes whose second input is a weight initializer are quantized: the attention
  score products (activation x activation), LayerNorm, Softmax, GELU and the patch projection stay float,
  which is where ViT quantization error concentrates;
* calibration: MinMax by default (fast, and robust on the small calibration sets used here); percentile
  and entropy are available for models with activation outliers.

The variants ``bench/bench_int8.py`` compares (the export default stays the QDQ ``cpu`` scheme until one of
them measures faster on a quiet machine): ONNX Runtime's transformer fusions first
(:func:`fuse_transformer`: GELU, skip + LayerNorm, attention where its pattern matches), the QOperator format
instead of QDQ, per-tensor instead of per-channel weights, and dynamic quantization (activations quantized
per batch at run time, no calibration) of the same weight matmuls.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from dinoforge.export.errors import ExportError

log = logging.getLogger(__name__)
CalibMethod = Literal["minmax", "percentile", "entropy"]
Int8Scheme = Literal["cpu", "tensorrt"]
QuantFormatName = Literal["qdq", "qoperator"]


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul/Gemm nodes whose second operand is an initializer (i.e. a linear layer)."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and (n.input[1] in inits | consts)]


class _BatchReader:
    """onnxruntime ``CalibrationDataReader`` over a prepared input array."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self._batches: Iterator[np.ndarray] = iter([data[i:i + batch] for i in range(0, len(data), batch)])
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # part of the reader protocol; calibration reads once
        raise NotImplementedError("calibration data is read once")


def fuse_transformer(model: onnx.ModelProto, num_heads: int, hidden_size: int
                     ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer fusions (its python fusion pass, no graph-level optimisation).

    Returns:
        The fused graph (``com.microsoft`` ops: ``Gelu``, ``SkipLayerNormalization``, ``Attention`` where the
        attention pattern matches) and how many of each fused operator it holds.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(model, model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                           optimization_options=FusionOptions("vit"), opt_level=0)
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    model = fused.model
    if stats and not any(o.domain == "com.microsoft" for o in model.opset_import):
        # the fused operators live in ONNX Runtime's domain; shape inference (dynamic quantization) needs it declared
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, stats


def quantize_dynamic_int8(model: onnx.ModelProto, *, per_channel: bool = True) -> onnx.ModelProto:
    """Dynamic int8 of the weight matmuls: weights int8 offline, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = weight_matmuls(model)
    if not nodes:
        raise ExportError("no weight MatMul/Gemm found to quantize")
    with tempfile.TemporaryDirectory(prefix="dinoforge-int8-") as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        onnx.save_model(model, str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_quantize=nodes)
        return onnx.load(str(dst))


def quantize_int8(model: onnx.ModelProto, calibration: np.ndarray, *, scheme: Int8Scheme = "cpu",
                  method: CalibMethod = "minmax", batch: int = 16, quant_format: QuantFormatName = "qdq",
                  per_channel: bool = True) -> onnx.ModelProto:
    """Quantize an fp32 graph to int8 (QDQ by default).

    Args:
        model: fp32 graph with one input.
        calibration: model inputs ``[N, ...]`` (float32 NCHW or uint8 NHWC, as the graph expects).
        scheme: ``cpu`` (uint8 asymmetric activations) or ``tensorrt`` (int8 symmetric, zero points 0).
        method: calibration method.
        batch: calibration batch size.
        quant_format: ``qdq`` (Q/DQ pairs around float ops, the format TensorRT reads) or ``qoperator``
            (quantized operators such as ``QLinearMatMul``; ONNX Runtime only).
        per_channel: one weight scale per output channel (default) or one per tensor.

    Returns:
        The quantized graph (metadata is not copied; the caller sets it).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("int8 calibration needs at least one image")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory(prefix="dinoforge-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save_model(model, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        prepared = onnx.load(str(pre))
        nodes = weight_matmuls(prepared)
        if not nodes:
            raise ExportError("no weight MatMul/Gemm found to quantize")
        reader = _BatchReader(model.graph.input[0].name, calibration, batch)
        symmetric = scheme == "tensorrt"
        extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True, "CalibPercentile": 99.99}
        activation = QuantType.QInt8 if symmetric else QuantType.QUInt8
        formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
        quantize_static(str(pre), str(dst), reader, quant_format=formats[quant_format], per_channel=per_channel,
                        activation_type=activation, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=methods[method], extra_options=extra)
        log.info("quantized %d weight matmuls to int8 (%s scheme, calibration: %d inputs, %s)", len(nodes),
                 scheme, len(calibration), method)
        return onnx.load(str(dst))
