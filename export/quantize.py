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

``dynamic`` (:func:`quantize_dynamic_int8`, the export's ``--int8-scheme dynamic``): no calibration, activations
quantized per batch at run time; the fastest on ONNX Runtime's x86 CPU provider for ViTs (ViT-S/14 2.31x fp32 where
static QDQ gave 1.84x, docs/benchmarks.md), not readable by TensorRT. The export default stays the static QDQ
``cpu`` scheme: calibrated, plain ONNX Q/DQ nodes that every ONNX Runtime provider runs, and the same graph
as the TensorRT form (``tensorrt``) up to its activation zero points.

The variants ``bench/bench_int8.py`` compares: ONNX Runtime's transformer fusions first (:func:`fuse_transformer`:
one ``Attention`` node per block — the fp32 graph of :class:`~dinoforge.export.graph.ExportableViT` is written
in the form the fusion matches —, ``SkipLayerNormalization``, ``BiasGelu``), the QOperator format instead of QDQ,
per-tensor instead of per-channel weights, and dynamic quantization (activations quantized per batch at run
time, no calibration). Which ops each path turns int8:

* dynamic: every weight matmul (``DynamicQuantizeMatMul`` once ONNX Runtime fuses it) and the fused
  ``Attention`` (``QAttention``: int8 qkv projection, float softmax);
* static (QDQ / QOperator): weight matmuls only — ONNX Runtime has no static quantized ``Attention``, so the
  static variants fuse to ``MultiHeadAttention`` (``attention="mha"``), which keeps the q / k / v projections
  as plain ``MatMul`` nodes the quantizer reaches;
* always float: LayerNorm / SkipLayerNorm, Softmax, GELU, the attention score products, and convolutions
  (patch projection, conv or MobileNetV2 stem) unless ``convs=True``: ONNX Runtime's dynamic ``ConvInteger``
  has no fast CPU kernel and int8 depthwise convolutions are often slower than fp32 on x86, while the stem
  is a small share of a hybrid model's compute — the bench times the option.
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
AttentionFusion = Literal["attention", "mha"]
CalibMethod = Literal["minmax", "percentile", "entropy"]
StaticScheme = Literal["cpu", "tensorrt"]
Int8Scheme = Literal["cpu", "tensorrt", "dynamic"]
QuantFormatName = Literal["qdq", "qoperator"]


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul/Gemm nodes whose second operand is an initializer (i.e. a linear layer)."""
    return quantizable_nodes(model)


def quantizable_nodes(model: onnx.ModelProto, *, attention: bool = False, convs: bool = False) -> list[str]:
    """Names of the nodes to quantize: weight MatMul/Gemm, plus fused ``Attention`` and ``Conv`` if asked.

    A node qualifies when its second input (the weight) is an initializer or a ``Constant``.
    """
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    types = {"MatMul", "Gemm"} | ({"Attention"} if attention else set()) | ({"Conv"} if convs else set())
    return [n.name for n in model.graph.node
            if n.op_type in types and len(n.input) > 1 and n.input[1] in weights]


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


def fuse_transformer(model: onnx.ModelProto, num_heads: int, hidden_size: int, *,
                     attention: AttentionFusion = "attention") -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer fusions (its python fusion pass, no graph-level optimisation).

    Args:
        model: fp32 graph (left unchanged: the fusion pass rewrites a copy).
        num_heads, hidden_size: the backbone's attention heads and width.
        attention: ``attention`` fuses each block's attention with its qkv projection into one ``Attention``
            node (what dynamic int8 turns into ``QAttention``); ``mha`` into ``MultiHeadAttention`` after
            q / k / v ``MatMul`` nodes that stay outside (what static int8 can quantize).

    Returns:
        The fused graph (``com.microsoft`` ops: ``Attention`` or ``MultiHeadAttention``, ``BiasGelu``,
        ``SkipLayerNormalization``) and how many of each fused operator it holds.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    options.use_multi_head_attention = attention == "mha"
    source = onnx.ModelProto()
    source.CopyFrom(model)  # optimize_model rewrites the proto it is given in place
    fused = optimize_model(source, model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                           optimization_options=options, opt_level=0)
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    model = fused.model
    if stats and not any(o.domain == "com.microsoft" for o in model.opset_import):
        # the fused operators live in ONNX Runtime's domain; shape inference (dynamic quantization) needs it declared
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, stats


def quantize_dynamic_int8(model: onnx.ModelProto, *, per_channel: bool = True,
                          convs: bool = False) -> onnx.ModelProto:
    """Dynamic int8: weights int8 offline, activations quantized per batch at run time (no calibration).

    Quantizes the weight matmuls, each fused ``Attention`` (to ``QAttention``) and, with ``convs``, the
    convolutions (``ConvInteger``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = quantizable_nodes(model, attention=True, convs=convs)
    if not nodes:
        raise ExportError("no weight MatMul/Gemm found to quantize")
    with tempfile.TemporaryDirectory(prefix="dinoforge-int8-") as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        onnx.save_model(model, str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_quantize=nodes)
        return onnx.load(str(dst))


def quantize_int8(model: onnx.ModelProto, calibration: np.ndarray, *, scheme: StaticScheme = "cpu",
                  method: CalibMethod = "minmax", batch: int = 16, quant_format: QuantFormatName = "qdq",
                  per_channel: bool = True, convs: bool = False) -> onnx.ModelProto:
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
        convs: also quantize the convolutions (patch projection, stem); float by default (module docstring).

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
        nodes = quantizable_nodes(prepared, convs=convs)
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
