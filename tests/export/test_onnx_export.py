"""`dinoforge export onnx`: contract, exporters, precisions, parity gating and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dinoforge.core.artifact import load_artifact
from dinoforge.core.cli import main
from dinoforge.core.onnx_contract import read_export_metadata
from dinoforge.core.preprocess import normalize
from dinoforge.export.parity_data import load_images, to_pixels

FAST_FLAGS = ["--parity-limit", "20", "--knn-limit", "100"]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_layout_manifest_and_metadata(tiny_export: Path, tiny_artifact: Path) -> None:
    assert sorted(p.name for p in tiny_export.iterdir()) == \
        ["export.json", "model.json", "model_56.onnx", "model_84.onnx", "parity.json"]
    manifest = json.loads((tiny_export / "export.json").read_text())
    assert manifest["input"] == {"name": "pixel_values", "dtype": "float32", "layout": "NCHW"}
    assert [o["name"] for o in manifest["outputs"]] == ["cls_embedding", "mean_embedding"]
    assert [g["resolution"] for g in manifest["graphs"]] == [[56, 56], [84, 84]]
    model = onnx.load(str(tiny_export / "model_84.onnx"))
    meta = read_export_metadata(model)
    card = json.loads((tiny_artifact / "model.json").read_text())
    assert meta["model_card"] == card
    assert meta["export"]["resolution"] == [84, 84] and meta["export"]["exporter"] == "dynamo"
    assert meta["dinoforge.precision"] == "fp32" and meta["dinoforge.input_layout"] == "NCHW"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 5 and "Resize" not in ops
    assert next(o.version for o in model.opset_import if o.domain == "") >= 18


def test_dynamic_batch_matches_pytorch(tiny_export: Path, tiny_artifact: Path, sample_images_dir: Path) -> None:
    art = load_artifact(tiny_artifact)
    pre = art.card.preprocessing
    pixels = to_pixels(load_images(sample_images_dir, 16), pre, (84, 84))
    x = normalize(pixels.permute(0, 3, 1, 2), pre)
    with torch.no_grad():
        tokens = art.backbone.forward_features(x)
    session = _session(tiny_export / "model_84.onnx")
    for batch in (1, 3, 16):
        cls, mean = session.run(None, {"pixel_values": x[:batch].numpy()})
        np.testing.assert_allclose(cls, tokens[:batch, 0].numpy(), atol=2e-5)
        np.testing.assert_allclose(mean, tokens[:batch, 1:].mean(1).numpy(), atol=2e-5)


def test_parity_report_content(tiny_export: Path) -> None:
    report = json.loads((tiny_export / "parity.json").read_text())
    assert report["passed"] and set(report["graphs"]) == {"56", "84"}
    section = report["graphs"]["84"]
    assert section["batch16"]["cls_embedding"]["min_cosine"] > 0.9999
    assert section["batch1"]["mean_embedding"]["max_abs_error"] < 1e-4
    assert section["batch1_vs_batch16_max_abs"] < 1e-4
    assert (section["knn"]["n_index"], section["knn"]["n_queries"]) == (100, 100)
    assert section["knn"]["top1_agreement"] == 1.0 and section["knn"]["drop_pt"] == 0.0
    assert all(c["passed"] for c in section["checks"])


def test_embedded_preprocessing_and_patch_tokens(tiny_reg_raw_export: Path, tiny_reg_artifact: Path) -> None:
    art = load_artifact(tiny_reg_artifact)
    session = _session(tiny_reg_raw_export / "model_84.onnx")
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("pixels", "tensor(uint8)", [84, 84, 3])
    assert [o.name for o in session.get_outputs()] == ["cls_embedding", "mean_embedding", "patch_tokens"]
    pixels = torch.randint(0, 256, (2, 84, 84, 3), dtype=torch.uint8)
    cls, mean, patches = session.run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        tokens = art.backbone.forward_features(normalize(pixels.permute(0, 3, 1, 2), art.card.preprocessing))
    np.testing.assert_allclose(patches, tokens[:, 5:].numpy(), atol=3e-5)
    np.testing.assert_allclose(cls, tokens[:, 0].numpy(), atol=3e-5)
    assert patches.shape == (2, 36, 64)


def test_legacy_exporter_fp16_keeps_norms_fp32(tiny_reg_artifact: Path, tmp_path: Path,
                                               sample_images_dir: Path) -> None:
    out = tmp_path / "fp16"
    status = main(["export", "onnx", str(tiny_reg_artifact), "--out", str(out), "--resolutions", "56,112",
                   "--precision", "fp16", "--exporter", "legacy", "--parity-images", str(sample_images_dir),
                   *FAST_FLAGS])
    assert status == 0
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model_112.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == fp32, node.name
        if node.op_type == "MatMul":
            assert types[node.input[0]] == fp16, node.name
    assert all(types[o.name] == fp32 for o in model.graph.output)
    report = json.loads((out / "parity.json").read_text())
    assert read_export_metadata(model)["export"]["exporter"] == "legacy"
    assert report["graphs"]["112"]["batch16"]["cls_embedding"]["min_cosine"] >= 0.999


def test_int8_static_qdq_per_channel(tiny_artifact: Path, tmp_path: Path, sample_images_dir: Path) -> None:
    out = tmp_path / "int8"
    status = main(["export", "onnx", str(tiny_artifact), "--out", str(out), "--resolutions", "56",
                   "--precision", "int8", "--calibration", str(sample_images_dir), "--calibration-limit", "16",
                   "--int8-scheme", "tensorrt", "--parity-images", str(sample_images_dir), *FAST_FLAGS,
                   # random tiny model on 100 k-NN images: one flipped neighbour vote is already 1 pt
                   "--threshold", "max_knn_drop_pt=5"])
    assert status == 0
    model = onnx.load(str(out / "model_56.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 2]
    assert len(weight_dq) == 12  # q, k, v (split for the attention fusion), proj, fc1, fc2 in 2 blocks
    assert all(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1 for n in weight_dq)  # per-channel
    section = json.loads((out / "parity.json").read_text())["graphs"]["56"]
    assert section["fp32_baseline"]["size_ratio"] < 0.8
    assert {"speedup", "knn_accuracy", "int8_knn_drop_vs_fp32_pt"} <= section["fp32_baseline"].keys()
    assert section["batch16"]["cls_embedding"]["min_cosine"] >= 0.99


def test_parity_failure_leaves_nothing(tiny_artifact: Path, tmp_path: Path, sample_images_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "fail", tmp_path / "failed-parity.json"
    status = main(["export", "onnx", str(tiny_artifact), "--out", str(out), "--threshold", "max_knn_drop_pt=-1",
                   "--report", str(report), "--parity-images", str(sample_images_dir), *FAST_FLAGS])
    assert status == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [report]
    assert "knn.drop_pt" in capsys.readouterr().err
    assert json.loads(report.read_text())["passed"] is False


@pytest.mark.parametrize(("extra", "message"), [
    (["--resolutions", "50"], "not a positive multiple of the patch size 14"),
    (["--resolutions", "56,56"], "listed twice"),
    (["--precision", "int8"], "needs --calibration"),
    (["--opset", "17"], "opset"),
    (["--threshold", "fp32_min_cosin=1"], "unknown key 'fp32_min_cosin'"),
    (["--parity-images", "/nonexistent"], "does not exist"),
])
def test_bad_input_exit_2(tiny_artifact: Path, tmp_path: Path, extra: list[str], message: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", "onnx", str(tiny_artifact), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_artifact_and_existing_out(tiny_export: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not an artifact directory" in capsys.readouterr().err
    before = sorted(p.name for p in tiny_export.iterdir())
    assert main(["export", "onnx", str(tiny_export.parent), "--out", str(tiny_export)]) == 2
    assert sorted(p.name for p in tiny_export.iterdir()) == before
