"""ONNX Runtime's transformer fusions on the exported graph, and int8 of the fused graph.

The fp32 graph of ``ExportableViT`` is written in the form ONNX Runtime's fusion pass matches: one ``Attention``
(or ``MultiHeadAttention``) per block, ``SkipLayerNormalization`` for every residual + LayerNorm, ``BiasGelu``
for the MLP. Counted here on the tiny models, with parity after fusion and after int8.
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
from dinoforge.export.quantize import fuse_transformer, quantizable_nodes, quantize_dynamic_int8, quantize_int8

pytestmark = pytest.mark.slow  # exports and quantizes small graphs

HW = (56, 56)


def _trained_like(arch: str) -> DinoVisionTransformer:
    """A tiny backbone with non-zero biases and per-channel LayerScale, as after training.

    Zero biases (a fresh init) are removed by the graph simplifier, and the fusion needs the bias ``Add``.
    """
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
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
    # 2 residual + LayerNorm pairs per block; the last one's partner is the final norm, the first norm1 stays
    assert stats == {"Attention": depth, "BiasGelu": depth, "SkipLayerNormalization": 2 * depth,
                     "LayerNormalization": 1}
    ops = _ops(fused)
    assert "Softmax" not in ops and "Div" not in ops and ops["MatMul"] == 3 * depth  # proj, fc1, fc2 remain
    x = _inputs(3)
    np.testing.assert_allclose(_run(fused, x), _run(fp32, x), rtol=0, atol=1e-4)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x))[:, 0].numpy()  # [3, D]
    np.testing.assert_allclose(_run(fused, x), ref, rtol=0, atol=1e-4)


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


def test_convolutions_are_quantized_only_when_asked(graphs) -> None:
    fp32, _ = graphs["test"]
    assert quantizable_nodes(fp32, convs=True) == [n.name for n in fp32.graph.node
                                                  if n.op_type == "Conv"] + quantizable_nodes(fp32)
    int8 = quantize_int8(fp32, _inputs(8, seed=2), quant_format="qoperator", convs=True)
    assert _ops(int8)["QLinearConv"] == 1  # the patch projection
    x = _inputs(2, seed=1)
    assert _min_cosine(_run(int8, x), _run(fp32, x)) > 0.99
