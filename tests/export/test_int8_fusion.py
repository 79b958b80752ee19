"""ONNX Runtime's transformer fusions on the exported graph, and int8 of the fused graph.

The fp32 graph of ``ExportableViT`` is written in the form ONNX Runtime's fusion pass matches: one ``Attention``
(or ``MultiHeadAttention``) per block, ``BiasGelu`` for the MLP (``SkipLayerNormalization`` for every residual +
LayerNorm on request). The conv stem of a hybrid is quantized whole. Counted here on the tiny models, with
parity after fusion and after int8.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dinoforge.core.backbone import DinoVisionTransformer, build_backbone
from dinoforge.export.graph import ExportableViT
from dinoforge.export.onnx_export import export_module
from dinoforge.core.ort_session import create_session
from dinoforge.export.errors import ExportError
from dinoforge.export.quantize import (block_starts, conv_stem_nodes, embedding_cosine, fuse_transformer,
                                       quantizable_nodes, quantize_dynamic_int8, quantize_graph, quantize_int8,
                                       quantize_mixed_int8, quantize_stem)

pytestmark = pytest.mark.slow  # exports and quantizes small graphs

HW = (56, 56)


def _trained_like(arch: str, **kwargs: object) -> DinoVisionTransformer:
    """A tiny backbone with non-zero biases and per-channel LayerScale, as after training.

    Zero biases (a fresh init) are removed by the graph simplifier, and the fusion needs the bias ``Add``.
    """
    torch.manual_seed(0)
    model = build_backbone(arch, **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.05)
            elif name.endswith("gamma"):
                param.uniform_(0.2, 1.5)
    return model


@pytest.fixture(scope="module")
def graphs() -> dict[str, tuple[onnx.ModelProto, DinoVisionTransformer]]:
    out = {}
    for arch in ("test", "test_reg4"):
        model = _trained_like(arch)
        out[arch] = (export_module(ExportableViT(model, HW))[0], model)
    return out


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["cls_embedding"], {session.get_inputs()[0].name: x})[0]  # [B, D]


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *HW)).astype(np.float32)  # [n, 3, H, W]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)).min())


@pytest.mark.parametrize("arch", ["test", "test_reg4"])
def test_one_attention_per_block_and_exact_fp32(graphs, arch: str) -> None:
    fp32, model = graphs[arch]
    before = fp32.SerializeToString()
    depth, cfg = len(model.blocks), model.config
    fused, stats = fuse_transformer(fp32, cfg.num_heads, cfg.embed_dim)
    assert fp32.SerializeToString() == before  # the caller's graph is not rewritten
    # residual Add + LayerNorm stay two operators (ONNX Runtime's CPU SkipLayerNormalization is the slower form)
    assert stats == {"Attention": depth, "BiasGelu": depth, "LayerNormalization": 2 * depth + 1}
    ops = _ops(fused)
    assert "SkipLayerNormalization" not in ops
    assert "Softmax" not in ops and "Div" not in ops and ops["MatMul"] == 3 * depth  # proj, fc1, fc2 remain
    x = _inputs(3)
    np.testing.assert_allclose(_run(fused, x), _run(fp32, x), rtol=0, atol=1e-4)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x))[:, 0].numpy()  # [3, D]
    np.testing.assert_allclose(_run(fused, x), ref, rtol=0, atol=1e-4)


def test_skip_layer_norm_fusion_on_request(graphs) -> None:
    fp32, model = graphs["test"]
    depth, cfg = len(model.blocks), model.config
    fused, stats = fuse_transformer(fp32, cfg.num_heads, cfg.embed_dim, skip_layer_norm=True)
    # 2 residual + LayerNorm pairs per block; the last one's partner is the final norm, the first norm1 stays
    assert stats == {"Attention": depth, "BiasGelu": depth, "SkipLayerNormalization": 2 * depth,
                     "LayerNormalization": 1}
    x = _inputs(2)
    np.testing.assert_allclose(_run(fused, x), _run(fp32, x), rtol=0, atol=1e-4)


def test_multi_head_attention_keeps_the_qkv_matmuls(graphs) -> None:
    fp32, model = graphs["test"]
    depth, cfg = len(model.blocks), model.config
    fused, stats = fuse_transformer(fp32, cfg.num_heads, cfg.embed_dim, attention="mha")
    assert stats["MultiHeadAttention"] == depth and "Attention" not in stats
    assert _ops(fused)["MatMul"] == 6 * depth  # q, k, v, proj, fc1, fc2: all quantizable by static int8
    x = _inputs(2)
    np.testing.assert_allclose(_run(fused, x), _run(fp32, x), rtol=0, atol=1e-4)


def test_dynamic_int8_quantizes_the_fused_attention(graphs) -> None:
    fp32, model = graphs["test"]
    depth, cfg = len(model.blocks), model.config
    fused, _ = fuse_transformer(fp32, cfg.num_heads, cfg.embed_dim)
    int8 = quantize_dynamic_int8(fused)
    ops = _ops(int8)
    assert ops["QAttention"] == depth and "Attention" not in ops
    assert ops["MatMulInteger"] == 3 * depth and "MatMul" not in ops
    assert "Conv" in ops and "ConvInteger" not in ops  # the patch projection stays float by default
    x = _inputs(4, seed=1)
    assert _min_cosine(_run(int8, x), _run(fp32, x)) > 0.99


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_static_int8_of_the_mha_graph(graphs, fmt: str) -> None:
    fp32, model = graphs["test"]
    depth, cfg = len(model.blocks), model.config
    fused, _ = fuse_transformer(fp32, cfg.num_heads, cfg.embed_dim, attention="mha")
    int8 = quantize_int8(fused, _inputs(16, seed=2), quant_format=fmt, batch=8)
    ops = _ops(int8)
    if fmt == "qoperator":
        assert ops["QLinearMatMul"] == 6 * depth and "MatMul" not in ops
    else:  # QDQ: every matmul reads a dequantized int8 weight; LayerNorm, softmax and GELU get no Q/DQ pair
        weights = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
        assert sum(n.op_type == "MatMul" and n.input[1] in weights for n in int8.graph.node) == 6 * depth
    assert ops["MultiHeadAttention"] == depth and "QLinearConv" not in ops
    x = _inputs(4, seed=1)
    assert _min_cosine(_run(int8, x), _run(fp32, x)) > 0.99


def test_a_pure_vit_has_no_conv_stem_to_quantize(graphs) -> None:
    fp32, _ = graphs["test"]
    assert conv_stem_nodes(fp32) == []  # the patch projection reads the image: it stays float
    assert quantizable_nodes(fp32, convs=True) == quantizable_nodes(fp32)


def _hybrid() -> tuple[onnx.ModelProto, DinoVisionTransformer]:
    """The tiny hybrid ViT: MobileNetV2 blocks (frozen batch norms, folded by the export) + 2 ViT blocks."""
    model = _trained_like("test", patch_size=16, img_size=64, mobilenet_stem_blocks=7)
    return export_module(ExportableViT(model, (64, 64)))[0], model


def _stem_inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)  # [n, 3, 64, 64]


def test_the_conv_stem_is_int8_end_to_end() -> None:
    """Stem convs, their ReLU6 and residual adds are quantized together: no float op is left between them."""
    fp32, _ = _hybrid()
    convs = [n.name for n in fp32.graph.node if n.op_type == "Conv"]
    stem = conv_stem_nodes(fp32)
    assert convs[0] not in stem and set(convs[1:]) <= set(stem)  # all but the image's convolution
    assert {n.op_type for n in fp32.graph.node if n.name in stem} == {"Conv", "Clip", "Add"}
    int8 = quantize_int8(fp32, _stem_inputs(16, 2), quant_format="qoperator", convs=True, matmuls=False, batch=8)
    ops = _ops(int8)
    assert ops["QLinearConv"] == len(convs) - 1 and ops["QLinearAdd"] >= 1 and ops["Conv"] == 1
    assert ops["Clip"] == 1  # the image convolution's ReLU6; the others are absorbed into the output ranges
    assert "QLinearMatMul" not in ops and ops["MatMul"] >= 3  # matmuls=False: the transformer stays float
    x = _stem_inputs(4, 1)
    assert _min_cosine(_run(int8, x), _run(fp32, x)) > 0.99


def test_stem_blocks_begin_where_no_activation_feeds_a_convolution() -> None:
    fp32, _ = _hybrid()
    stem = conv_stem_nodes(fp32)
    kinds = {n.name: n.op_type for n in fp32.graph.node}
    starts = block_starts(fp32)
    # MobileNetV2: block 0 is depthwise -> ReLU6 -> project (3 nodes), block 1 adds the expansion (5), residual
    # blocks end with their Add (6)
    assert starts[:4] == [0, 3, 8, 14]
    for start in starts:
        assert kinds[stem[start]] == "Conv" and (start == 0 or kinds[stem[start - 1]] in ("Conv", "Add"))


def test_the_stem_is_int8_from_the_first_block_that_keeps_the_embeddings() -> None:
    """An outlier channel in block 0's linear projection ruins a per-tensor activation scale: int8 starts later."""
    model = _trained_like("test", patch_size=16, img_size=64, mobilenet_stem_blocks=7)
    with torch.no_grad():
        model.patch_embed.stem[1].conv[1].weight[0] *= 300
    fp32 = export_module(ExportableViT(model, (64, 64)))[0]
    x = _stem_inputs(16, 2)
    threshold = 0.999985  # between the cosines with block 0 int8 (~0.99998) and without (~0.99999)
    int8, start = quantize_stem(fp32, x, min_cosine=threshold)
    assert start is not None and start > 0
    assert embedding_cosine(fp32, int8, x) >= threshold
    for earlier in [s for s in block_starts(fp32) if s < start]:
        tried = quantize_int8(fp32, x, convs=True, matmuls=False, stem_from=earlier)
        assert embedding_cosine(fp32, tried, x) < threshold, earlier
    dq = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    first_int8 = conv_stem_nodes(fp32)[start]
    assert [n.name for n in int8.graph.node if n.op_type == "Conv" and n.input[1] in dq][0] == first_int8
    unchanged, none = quantize_stem(fp32, x, min_cosine=1.01)  # no start can reach it: the float graph back
    assert none is None and unchanged is fp32


def test_mixed_int8_of_a_hybrid() -> None:
    fp32, model = _hybrid()
    cfg = model.config
    int8 = quantize_graph(fp32, "mixed", _stem_inputs(16, 2), cfg.num_heads, cfg.embed_dim)
    ops = _ops(int8)
    assert ops["QAttention"] == len(model.blocks) and "SkipLayerNormalization" not in ops
    dq = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [n.input[1] in dq for n in int8.graph.node if n.op_type == "Conv"]
    assert not quantized[0] and quantized[-1] and quantized == sorted(quantized)  # float blocks, then int8 ones
    x = _stem_inputs(4, 1)
    session = create_session(int8.SerializeToString())
    out = session.run(["cls_embedding"], {session.get_inputs()[0].name: x})[0]  # [4, D]
    assert _min_cosine(out, _run(fp32, x)) > 0.99


def test_mixed_with_no_bar_turns_the_whole_stem_int8() -> None:
    """``min_cosine=-1`` (the bench's ``mixed, whole stem``): every stem block int8, only the image's conv float."""
    fp32, model = _hybrid()
    cfg = model.config
    int8 = quantize_mixed_int8(fp32, _stem_inputs(16, 2), cfg.num_heads, cfg.embed_dim, min_cosine=-1.0)
    dq = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [n.input[1] in dq for n in int8.graph.node if n.op_type == "Conv"]
    assert quantized == [False] + [True] * (len(quantized) - 1)
    assert _ops(int8)["QAttention"] == len(model.blocks)


def test_mixed_without_a_stem_is_dynamic(graphs) -> None:
    fp32, model = graphs["test"]
    cfg = model.config
    mixed = quantize_graph(fp32, "mixed", _inputs(8, seed=2), cfg.num_heads, cfg.embed_dim)
    dynamic = quantize_graph(fp32, "dynamic", None, cfg.num_heads, cfg.embed_dim)
    assert _ops(mixed) == _ops(dynamic) and _ops(mixed)["QAttention"] == len(model.blocks)
    with pytest.raises(ExportError, match="calibration"):
        quantize_graph(fp32, "mixed", None, cfg.num_heads, cfg.embed_dim)
