"""ExportableViT computes exactly what the backbone computes, without any Resize."""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch

from dinoforge.core.backbone import build_backbone
from dinoforge.core.preprocess import PreprocessConfig, normalize
from dinoforge.export.graph import ExportableViT
from dinoforge.export.trt_lint import lint_model


@pytest.mark.parametrize("arch", ["test", "test_reg4"])
@pytest.mark.parametrize("hw", [(56, 56), (84, 112)])
def test_matches_backbone_fp32(arch: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    module = ExportableViT(model, hw, patch_tokens=True).eval()
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        ref = model.forward_features(x)  # [3, 1 + R + h*w, D]
        cls, mean, patches = module(x)
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, ref[:, prefix:].mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, ref[:, prefix:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("strides", [(1,), (2, 2)])
def test_conv_stem_models_export_exactly(strides: tuple[int, ...]) -> None:
    """A backbone with a convolutional stem (stride 1 or strided): the stem runs before the projection."""
    torch.manual_seed(0)
    channels = (8,) * len(strides)
    model = build_backbone("test", patch_size=16, img_size=64, stem_channels=channels, stem_strides=strides).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model.forward_features(x)[:, 0]  # [2, D]
        cls, _ = ExportableViT(model, (64, 96)).eval()(x)
        half, _ = ExportableViT(model, (64, 96), dtype=torch.float16).eval()(x)
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=0)
    assert torch.nn.functional.cosine_similarity(half, ref).min() > 0.999


@pytest.mark.parametrize("stem", [{"stem_channels": (8, 8), "stem_strides": (2, 2)},
                                  {"mobilenet_stem_blocks": 7}])  # a hybrid ViT: MobileNetV2 blocks, frozen BN
def test_conv_stem_model_passes_the_export_contract(tmp_path, sample_images_dir, stem) -> None:
    """The whole export (structural checks, parity report) accepts a stem model's graph; the card rebuilds it."""
    import json

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.checkpoint import load_backbone
    from dinoforge.export.pipeline import OnnxExportOptions, export_onnx

    torch.manual_seed(0)
    model = build_backbone("test", patch_size=16, img_size=64, **stem)
    pre = PreprocessConfig(mode="resize", size=64, resize_size=None, patch_size=16)
    art = save_artifact(tmp_path / "art", model, name="stem", preprocessing=pre,
                        provenance=Provenance(source="random-init"))
    # no k-NN gate: a random MobileNetV2 stem (frozen, untrained norms) maps images within ~1e-6 of each other,
    # so which neighbour wins is decided by float rounding; the embedding checks (cosine, ~1e-6 errors) remain
    export_onnx(art, tmp_path / "onnx", OnnxExportOptions(resolutions="64", parity_images=sample_images_dir,
                                                          parity_limit=8, knn_limit=0))
    assert json.loads((tmp_path / "onnx" / "parity.json").read_text())["passed"]
    loaded = load_backbone(art).backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.eval().forward_features(x), rtol=0, atol=0)


def test_fp16_keeps_layernorm_fp32_and_stays_close() -> None:
    torch.manual_seed(0)
    model = build_backbone("test_reg4").eval()
    module = ExportableViT(model, (84, 84), dtype=torch.float16).eval()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(n.weight.dtype == torch.float32 for n in norms)
    assert module.blocks[0].attn.qkv.weight.dtype == torch.float16
    x = torch.randn(4, 3, 84, 84)
    with torch.no_grad():
        cls, _ = module(x)
        ref = model.forward_features(x)[:, 0]
    assert cls.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(cls, ref).min() > 0.999


def test_embedded_preprocessing_is_core_normalize() -> None:
    torch.manual_seed(0)
    model = build_backbone("test").eval()
    pre = PreprocessConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    module = ExportableViT(model, (56, 56), preprocess=pre).eval()
    pixels = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        cls, _ = module(pixels)
        ref = model.forward_features(normalize(pixels.permute(0, 3, 1, 2), pre))[:, 0]
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=0)


def test_naive_register_exports_break_as_reported() -> None:
    """The problem being solved: the training module of a register model does not export cleanly.

    The legacy exporter refuses the resampled parameter outright; the dynamo exporter with a dynamic image
    size writes an antialiased Resize, which check-trt flags (TensorRT cannot build it).
    """
    torch.manual_seed(0)
    model = build_backbone("test_reg4").eval()

    class Naive(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(x)[:, 0]

    x = torch.randn(1, 3, 84, 84)
    with pytest.raises(RuntimeError), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Naive(), (x,), io.BytesIO(), dynamo=False, opset_version=18)
    grid = torch.export.Dim("grid", min=2, max=64)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Naive(), (x,), buffer, dynamo=True, opset_version=18,
                          dynamic_shapes=({2: 14 * grid, 3: 14 * grid},))
    naive = onnx.load_from_string(buffer.getvalue())
    findings = [f for f in lint_model(naive) if f.rule == "resize-antialias"]
    assert len(findings) == 1
    resize = [n for n in naive.graph.node if n.op_type == "Resize"]
    assert findings[0].node == resize[0].name


def test_knn_report_and_gates() -> None:
    from dinoforge.export.parity import ParityThresholds, gate, knn_report

    torch.manual_seed(0)
    centers = torch.randn(5, 16) * 3
    labels = torch.arange(60) % 5
    emb = centers[labels] + torch.randn(60, 16)  # [60, 16] separable classes
    index, queries = emb[:40], emb[40:]
    same = knn_report((index, queries), (index, queries), labels[:40], labels[40:])
    assert same["top1_agreement"] == 1.0 and same["drop_pt"] == 0.0 and same["accuracy"] > 0.9
    noisy = knn_report((index, torch.randn(20, 16)), (index, queries), labels[:40], labels[40:])
    assert noisy["top1_agreement"] < 0.6 and noisy["drop_pt"] > 30
    metric = {"min_cosine": 0.9995, "mean_cosine": 0.9999, "max_abs_error": 0.01}
    section = {"batch16": {"cls_embedding": metric, "mean_embedding": metric},
               "batch1": {"cls_embedding": metric, "mean_embedding": metric}, "knn": noisy}
    fp16 = {c.name: c.passed for c in gate(section, "fp16", ParityThresholds())}
    assert all(v for k, v in fp16.items() if k != "knn.drop_pt") and not fp16["knn.drop_pt"]
    assert not any(c.passed for c in gate(section, "fp32", ParityThresholds()) if "cosine" in c.name)


def test_fp32_attention_is_split_and_layerscale_folded_exactly() -> None:
    """fp32: q / k / v Linears and LayerScale folded (the form ONNX Runtime fuses), same outputs; fp16 keeps both."""
    from timm.layers import LayerScale

    from dinoforge.export.graph import SplitQKV

    torch.manual_seed(0)
    model = build_backbone("test_reg4").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.01, 2.0)  # per-channel LayerScale, as after training
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
    module = ExportableViT(model, (56, 56)).eval()
    assert all(isinstance(b.attn.qkv, SplitQKV) and isinstance(b.ls1, torch.nn.Identity)
               and isinstance(b.ls2, torch.nn.Identity) for b in module.blocks)
    assert isinstance(model.blocks[0].ls1, LayerScale)  # the backbone itself is not modified
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], model.forward_features(x)[:, 0], atol=1e-5, rtol=0)
    half = ExportableViT(model, (56, 56), dtype=torch.float16)
    assert isinstance(half.blocks[0].attn.qkv, torch.nn.Linear) and isinstance(half.blocks[0].ls1, LayerScale)
