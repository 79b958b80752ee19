"""``dinoforge export edge``: the self-contained device folder, and the uint8 graph equal to the float one."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dinoforge.core import preprocess_np
from dinoforge.core.card import read_card
from dinoforge.core.cli import main as cli_main
from dinoforge.core.preprocess import decode_image

pytestmark = pytest.mark.slow  # two real exports with parity checks

COMMON = ["--parity-limit", "8", "--knn-limit", "0"]


@pytest.fixture(scope="module")
def edge_dirs(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two input kinds exported; ``printed`` is what the uint8 command printed."""
    root = tmp_path_factory.mktemp("edge")
    printed = io.StringIO()
    for kind in ("uint8", "float"):
        with contextlib.redirect_stdout(printed if kind == "uint8" else io.StringIO()):
            assert cli_main(["export", "edge", str(tiny_artifact), "--out", str(root / kind), "--input", kind,
                             *COMMON]) == 0
    (root / "printed.txt").write_text(printed.getvalue())
    return {"uint8": root / "uint8", "float": root / "float", "printed": root / "printed.txt"}


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model_56.onnx"), providers=["CPUExecutionProvider"])


def test_folder_is_self_contained_and_checksummed(edge_dirs: dict[str, Path], tiny_artifact: Path) -> None:
    folder = edge_dirs["uint8"]
    names = {p.name for p in folder.iterdir()}
    assert names == {"model_56.onnx", "model.json", "export.json", "parity.json", "edge.json", "README.md",
                     "build_engine.sh", "SHA256SUMS"}
    for line in (folder / "SHA256SUMS").read_text().splitlines():  # sha256sum -c format
        digest, name = line.split("  ")
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert read_card(folder).weights_sha256 == read_card(tiny_artifact).weights_sha256
    edge = json.loads((folder / "edge.json").read_text())
    assert edge["input"] | {"caller_does": ""} == {
        "name": "pixels", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", 56, 56, 3], "resolution": [56, 56],
        "normalisation_in_graph": True, "mean": list(read_card(tiny_artifact).preprocessing.mean),
        "std": list(read_card(tiny_artifact).preprocessing.std), "caller_does": ""}
    assert edge["tensorrt_lint"]["errors"] == 0
    assert "--minShapes=pixels:1x56x56x3" in edge["trtexec"] and "--maxShapes=pixels:32x56x56x3" in edge["trtexec"]
    script = (folder / "build_engine.sh").read_text()
    assert script.startswith("#!/bin/sh") and "trtexec --onnx=model_56.onnx" in script
    assert "trtexec --onnx=model_56.onnx" in (folder / "README.md").read_text()
    assert json.loads((folder / "parity.json").read_text())["passed"] is True
    float_edge = json.loads((edge_dirs["float"] / "edge.json").read_text())
    assert float_edge["input"]["shape"] == ["batch", 3, 56, 56] and float_edge["input"]["dtype"] == "float32"
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    assert f"8 files, {size:.2f} MB" in edge_dirs["printed"].read_text()  # the folder size is printed


def test_folded_uint8_graph_equals_float_graph_on_real_images(edge_dirs: dict[str, Path],
                                                              sample_images_dir: Path) -> None:
    """Cast, NHWC -> NCHW and normalisation inside the graph = the same steps on the host, to float precision."""
    cfg = read_card(edge_dirs["uint8"]).preprocessing
    files = sorted(sample_images_dir.glob("imagenet_*.jpg"))[::4] + sorted(sample_images_dir.glob("*.png"))[::4]
    pixels = np.stack([preprocess_np.pixels_for_graph(decode_image(p), cfg) for p in files])  # [B, 56, 56, 3]
    host = np.ascontiguousarray(preprocess_np.normalize(pixels, cfg).transpose(0, 3, 1, 2))  # [B, 3, 56, 56]
    names = ["cls_embedding", "mean_embedding"]
    folded = _session(edge_dirs["uint8"]).run(names, {"pixels": pixels})
    unfolded = _session(edge_dirs["float"]).run(names, {"pixel_values": host})
    for got, want in zip(folded, unfolded, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_two_resolutions_are_refused(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["export", "edge", str(tiny_artifact), "--out", str(tmp_path / "x"), "--resolution", "56,84",
                       *COMMON])
    assert status != 0 and "one graph" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dynamic_int8_needs_no_calibration_and_says_it_is_not_for_tensorrt(tiny_artifact: Path,
                                                                            tmp_path: Path) -> None:
    """--int8-scheme dynamic: weight matmuls int8, activations quantized at run time, parity-gated like the rest."""
    import onnx

    out = tmp_path / "dyn"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["export", "edge", str(tiny_artifact), "--out", str(out), "--precision", "int8",
                         "--int8-scheme", "dynamic", *COMMON]) == 0
    ops = {n.op_type for n in onnx.load(str(out / "model_56.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, sorted(ops)
    edge = json.loads((out / "edge.json").read_text())
    assert edge["precision"] == "int8" and edge["tensorrt_lint"]["errors"] > 0
    assert "--int8-scheme tensorrt" in (out / "README.md").read_text()
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    pixels = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    cls = _session(out).run(["cls_embedding"], {"pixels": pixels})[0]
    assert cls.shape == (3, read_card(out).embed_dim) and np.isfinite(cls).all()


def test_mixed_int8_of_a_hybrid_takes_the_uint8_graphs_stem(tmp_path: Path, sample_images_dir: Path) -> None:
    """--int8-scheme mixed on a hybrid ViT's uint8 graph: static int8 stem (not the image's conv), QAttention."""
    import onnx
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = build_backbone("test", patch_size=16, img_size=64, mobilenet_stem_blocks=7)
    with torch.no_grad():  # trained-like biases: the attention fusion needs the bias Add a fresh init lacks
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.05)
    pre = PreprocessConfig(mode="resize", size=64, resize_size=None, patch_size=16)
    art = save_artifact(tmp_path / "art", model, name="hybrid", preprocessing=pre,
                        provenance=Provenance(source="random-init"))
    out = tmp_path / "mixed"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["export", "edge", str(art), "--out", str(out), "--precision", "int8", "--int8-scheme",
                         "mixed", "--calibration", str(sample_images_dir), "--calibration-limit", "16",
                         *COMMON]) == 0
    graph = onnx.load(str(out / "model_64.onnx")).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [n.input[1] in dq for n in convs]
    assert not quantized[0] and quantized[-1] and quantized == sorted(quantized)  # float blocks, then int8 ones
    assert sum(n.op_type == "QAttention" for n in graph.node) == len(model.blocks)
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert json.loads((out / "edge.json").read_text())["tensorrt_lint"]["errors"] > 0
