"""INT8 for ONNX Runtime and TensorRT: static QDQ calibrated on real images, dynamic, and the two mixed.

The export's ``--int8-scheme`` (:func:`quantize_graph`):

* ``cpu`` (default) — static QDQ of the weight matmuls, per-channel symmetric int8 weights, asymmetric uint8
  activations (the u8s8 kernels ONNX Runtime's x86 CPU provider is fast with; s8s8 gave no speed-up). Plain
  ONNX Q/DQ nodes that every ONNX Runtime provider runs;
* ``tensorrt`` — the same with symmetric int8 activations, every zero point 0, as TensorRT requires;
* ``dynamic`` — no calibration: ONNX Runtime's transformer fusions (:func:`fuse_transformer`: one ``Attention``
  per block, bias + GELU), then every weight matmul (``DynamicQuantizeMatMul``) and attention (``QAttention``:
  int8 qkv projection, float softmax) int8, activations quantized per batch at run time;
* ``mixed`` — ``dynamic`` plus a convolutional stem static int8 end to end (:func:`conv_stem_nodes`), from the
  first block at which the embeddings stay within cosine 0.997 of the float graph on the calibration images
  (:func:`quantize_stem`), for hybrid ViTs whose stem is a large share of the time.

``dynamic`` and ``mixed`` use ``com.microsoft`` operators: ONNX Runtime only, not TensorRT. Measured on the
2-core Xeon (docs/edge.md): ViT-S/14 ``dynamic`` 2.8x fp32 where ``cpu`` gave 2.0x; the hybrid demo student
``mixed`` about 1.6x.

Why these choices:

* only weight matmuls (and a stem, if asked) are quantized: the attention score products, LayerNorm, softmax
  and GELU stay float, which is where ViT quantization error concentrates;
* residual ``Add`` + LayerNorm are not fused into ``SkipLayerNormalization``: its CPU kernel is slower than
  the pair (``dinoforge.core.ort_session``);
* a stem is quantized with its ReLU6 and residual adds, so ``QLinearConv`` chains into ``QLinearConv``;
  convolutions alone leave a dequantize / requantize pair around every activation, which cost more than int8
  saved. The image's own convolution (3 input channels) stays float, and so do the first blocks when int8 would
  move the embeddings (an ImageNet MobileNetV2's early blocks lose most under per-tensor activation scales).
  ONNX Runtime's dynamic ``ConvInteger`` has no fast CPU kernel, so the stem is always static, and its
  calibration images must look like what will be served;
* calibration: MinMax by default (fast, and robust on the small calibration sets used here); percentile and
  entropy are available for models with activation outliers.

``bench/bench_int8.py`` also times the forms that lost: unfused dynamic, ``SkipLayerNormalization``, the stem
under static QDQ (``qdq+convs``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from dinoforge.core.onnx_contract import EMBEDDING_OUTPUTS
from dinoforge.core.ort_session import create_session
from dinoforge.export.errors import ExportError
from dinoforge.export.parity import compare, run_session

log = logging.getLogger(__name__)
AttentionFusion = Literal["attention", "mha"]
CalibMethod = Literal["minmax", "percentile", "entropy"]
StaticScheme = Literal["cpu", "tensorrt"]
Int8Scheme = Literal["cpu", "tensorrt", "dynamic", "mixed"]
QuantFormatName = Literal["qdq", "qoperator"]
#: ``mixed``: the lowest CLS / mean embedding cosine to the float graph, on the calibration images, that an int8
#: stem may cost. Well above the int8 parity gate (0.99): at 0.995 the demo student's stem began a block earlier
#: and its export failed the k-NN gate (1.0 pt on 500 Fashion-MNIST queries); at 0.997 it passed (docs/edge.md).
STEM_MIN_COSINE = 0.997


def quantizable_nodes(model: onnx.ModelProto, *, attention: bool = False, convs: bool = False,
                      matmuls: bool = True, stem_from: int = 0) -> list[str]:
    """Names of the nodes to quantize: weight MatMul/Gemm, fused ``Attention`` and the conv stem, as asked.

    A MatMul/Gemm qualifies when its second input (the weight) is an initializer or a ``Constant``; ``convs``
    adds :func:`conv_stem_nodes` from index ``stem_from`` on.
    """
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    types = ({"MatMul", "Gemm"} if matmuls else set()) | ({"Attention"} if attention else set())
    names = [n.name for n in model.graph.node
             if n.op_type in types and len(n.input) > 1 and n.input[1] in weights]
    return (conv_stem_nodes(model)[stem_from:] if convs else []) + names


def _ancestors(model: onnx.ModelProto, node: onnx.NodeProto) -> set[str]:
    """Names of ``node`` and every node it reads from, directly or not."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if current.name not in seen:
            seen.add(current.name)
            todo += [producer[i] for i in current.input if i in producer]
    return seen


def conv_stem_nodes(model: onnx.ModelProto) -> list[str]:
    """The convolutional stem that static int8 takes whole: ``Conv``, ``Clip`` / ``Relu`` and residual ``Add``.

    These are the nodes upstream of the last convolution (the patch projection), less the convolution that
    reads the image and its activation. Quantizing a convolution's activation and residual with it lets ONNX
    Runtime chain ``QLinearConv`` into ``QLinearConv`` (the quantizer drops the ReLU6 into the output range);
    quantizing the convolutions alone leaves a dequantize / requantize pair around every activation, which cost
    more than the int8 convolutions saved (docs/edge.md). The image's convolution stays float: 3 input
    channels make a poor int8 GEMM (its ``QLinearConv`` took twice its fp32 time). A pure ViT has no stem:
    the empty list.
    """
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(convs) < 2:
        return []
    upstream = _ancestors(model, convs[-1])
    first = next(n for n in model.graph.node if n.op_type == "Conv" and n.name in upstream)
    skip = _ancestors(model, first)
    skip |= {n.name for n in model.graph.node if n.op_type in ("Clip", "Relu") and first.output[0] in n.input}
    kinds = ("Conv", "Clip", "Relu", "Add")
    return [n.name for n in model.graph.node if n.name in upstream and n.name not in skip and n.op_type in kinds]


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
                     attention: AttentionFusion = "attention", skip_layer_norm: bool = False
                     ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer fusions (its python fusion pass, no graph-level optimisation).

    Args:
        model: fp32 graph (left unchanged: the fusion pass rewrites a copy).
        num_heads, hidden_size: the backbone's attention heads and width.
        attention: ``attention`` fuses each block's attention with its qkv projection into one ``Attention``
            node (what dynamic int8 turns into ``QAttention``); ``mha`` into ``MultiHeadAttention`` after
            q / k / v ``MatMul`` nodes that stay outside (what static int8 can quantize).
        skip_layer_norm: also fuse each residual ``Add`` + LayerNorm into ``SkipLayerNormalization``. Off by
            default: that operator's CPU kernel is slower than the pair (``dinoforge.core.ort_session``), so
            the CPU graph keeps ``Add`` + ``LayerNormalization`` and the sessions do not re-fuse them.

    Returns:
        The fused graph (``com.microsoft`` ops: ``Attention`` or ``MultiHeadAttention``, ``BiasGelu``, and
        ``SkipLayerNormalization`` if asked) and how many of each fused operator it holds.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    options.use_multi_head_attention = attention == "mha"
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
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
    conv stem's convolutions (``ConvInteger``, which has no fast CPU kernel: ``mixed`` quantizes a stem statically).
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
                  per_channel: bool = True, convs: bool = False, matmuls: bool = True, stem_from: int = 0
                  ) -> onnx.ModelProto:
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
        convs: also quantize the convolutional stem (:func:`conv_stem_nodes`); float by default.
        matmuls: quantize the weight matmuls (``False`` with ``convs``: the stem alone, as ``mixed`` does).
        stem_from: with ``convs``, leave the stem's first ``stem_from`` nodes (:func:`conv_stem_nodes`) float.

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
        if stem_from and len(conv_stem_nodes(prepared)) != len(conv_stem_nodes(model)):
            # the index a caller chose refers to the graph it gave, not to the pre-processed one
            raise ExportError("the quantizer's pre-processing changed the conv stem; quantize it whole")
        nodes = quantizable_nodes(prepared, convs=convs, matmuls=matmuls, stem_from=stem_from)
        if not nodes:
            raise ExportError("no weight MatMul/Gemm found to quantize" if matmuls else "no conv stem to quantize")
        reader = _BatchReader(model.graph.input[0].name, calibration, batch)
        symmetric = scheme == "tensorrt"
        extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True, "CalibPercentile": 99.99}
        activation = QuantType.QInt8 if symmetric else QuantType.QUInt8
        formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
        quantize_static(str(pre), str(dst), reader, quant_format=formats[quant_format], per_channel=per_channel,
                        activation_type=activation, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=methods[method], extra_options=extra)
        log.info("quantized %d nodes to int8 (%s scheme, calibration: %d inputs, %s)", len(nodes),
                 scheme, len(calibration), method)
        return onnx.load(str(dst))


def block_starts(model: onnx.ModelProto) -> list[int]:
    """Where the stem's blocks begin, as indices into :func:`conv_stem_nodes`.

    A convolution begins a block unless an activation feeds it (MobileNetV2: expand -> ReLU6 -> depthwise ->
    ReLU6 -> project, then the residual ``Add``).
    """
    kinds = {n.name: n.op_type for n in model.graph.node}
    stem = conv_stem_nodes(model)
    return [j for j, name in enumerate(stem)
            if kinds[name] == "Conv" and (j == 0 or kinds[stem[j - 1]] not in ("Clip", "Relu"))]


def _embeddings(model: onnx.ModelProto, inputs: np.ndarray, batch: int = 16) -> dict[str, torch.Tensor]:
    """A graph's CLS and mean embeddings ``[N, D]`` over ``inputs`` ``[N, ...]``."""
    return run_session(create_session(model.SerializeToString()), inputs, batch)


def _lowest_cosine(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return min(compare(ours[name], ref[name])["min_cosine"] for name in EMBEDDING_OUTPUTS)


def embedding_cosine(a: onnx.ModelProto, b: onnx.ModelProto, inputs: np.ndarray, batch: int = 16) -> float:
    """The lowest cosine between two graphs' CLS and mean embeddings over ``inputs`` ``[N, ...]``."""
    return _lowest_cosine(_embeddings(a, inputs, batch), _embeddings(b, inputs, batch))


def quantize_stem(model: onnx.ModelProto, calibration: np.ndarray, min_cosine: float = STEM_MIN_COSINE
                  ) -> tuple[onnx.ModelProto, int | None]:
    """Static int8 of the conv stem from the first block that keeps the embeddings within ``min_cosine``.

    The early, high-resolution blocks of an ImageNet MobileNetV2 lose most under per-tensor activation scales
    (the demo student's mean embedding fell to cosine 0.936 with every block int8, 0.997 with the first three
    float). Each block start is tried in order on the calibration images; the first whose CLS and mean
    embeddings stay within ``min_cosine`` of the float graph's is kept.

    Returns:
        The graph and the index into :func:`conv_stem_nodes` where int8 begins (``None``: no start kept the
        embeddings, the graph is returned unchanged).
    """
    reference = _embeddings(model, calibration)  # the float graph's, once for every start tried
    for start in block_starts(model):
        stem_int8 = quantize_int8(model, calibration, convs=True, matmuls=False, stem_from=start)
        cosine = _lowest_cosine(_embeddings(stem_int8, calibration), reference)
        log.info("int8 stem from node %d: embedding cosine %.5f (needed %.3f)", start, cosine, min_cosine)
        if cosine >= min_cosine:
            return stem_int8, start
    return model, None


def quantize_mixed_int8(model: onnx.ModelProto, calibration: np.ndarray, num_heads: int, hidden_size: int,
                        min_cosine: float = STEM_MIN_COSINE) -> onnx.ModelProto:
    """``mixed``: a static int8 conv stem (:func:`quantize_stem`), then fused attention and dynamic int8 matmuls.

    The fastest form on ONNX Runtime's x86 CPU provider for a hybrid ViT and, without a stem, the same graph
    as ``dynamic``. ``min_cosine``: the stem's bar (:func:`quantize_stem`; -1 turns the whole stem int8, which
    benches use to show what the stem's first blocks cost).
    """
    if conv_stem_nodes(model):
        model, _ = quantize_stem(model, calibration, min_cosine)
    fused, _ = fuse_transformer(model, num_heads, hidden_size)
    return quantize_dynamic_int8(fused)


def quantize_graph(model: onnx.ModelProto, scheme: Int8Scheme, calibration: np.ndarray | None, num_heads: int,
                   hidden_size: int) -> onnx.ModelProto:
    """The int8 graph of ``dinoforge export ... --int8-scheme SCHEME`` (module docstring).

    ``calibration`` (model inputs ``[N, ...]``) is needed by every scheme but ``dynamic``.
    """
    if scheme == "dynamic":
        return quantize_dynamic_int8(fuse_transformer(model, num_heads, hidden_size)[0])
    if calibration is None:
        raise ExportError(f"--int8-scheme {scheme} needs calibration images")
    if scheme == "mixed":
        return quantize_mixed_int8(model, calibration, num_heads, hidden_size)
    return quantize_int8(model, calibration, scheme=scheme)
