"""TensorRT backend. The engine tests need `tensorrt` and a CUDA GPU and are skipped here with that reason;
what runs without them (the missing-dependency error, locating the ONNX an engine came from) runs always."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dinoforge.core.errors import ArtifactError, MissingDependencyError
from dinoforge.core.tensorrt import import_tensorrt
from dinoforge.serve.backends.tensorrt_backend import source_onnx

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA),
                               reason="TensorRT engine tests need the `tensorrt` package and a CUDA GPU "
                                      f"(tensorrt installed: {HAS_TRT}, CUDA: {HAS_CUDA})")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_clear_error() -> None:
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed: `pip install tensorrt`"):
        import_tensorrt()


def test_engine_finds_the_onnx_it_was_built_from(tmp_path: Path) -> None:
    engine = tmp_path / "engines" / "model_56-0123456789abcdef.plan"
    engine.parent.mkdir()
    engine.write_bytes(b"engine")
    with pytest.raises(ArtifactError, match="cannot find the ONNX graph"):
        source_onnx(engine)
    (engine.parent / "model_56.onnx").write_bytes(b"x")  # the only graph beside the engine
    assert source_onnx(engine) == engine.parent / "model_56.onnx"
    (engine.parent / "model_84.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="cannot find the ONNX graph"):
        source_onnx(engine)
    # the description written by `dinoforge export tensorrt` names the graph
    engine.with_suffix(".json").write_text(json.dumps({"key": "k", "onnx": "model_84.onnx"}))
    assert source_onnx(engine) == engine.parent / "model_84.onnx"
    engine.with_suffix(".json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        source_onnx(engine)


@needs_trt
@pytest.mark.slow
def test_tensorrt_backend_matches_onnxruntime(tiny_artifact: Path, tmp_path: Path, sample_bytes: list[bytes]) -> None:
    from dinoforge.core.cli import main as cli_main
    from dinoforge.core.preprocess import decode_image
    from dinoforge.serve.backends.onnx_backend import OnnxRuntimeBackend
    from dinoforge.serve.backends.tensorrt_backend import TensorRTBackend

    out = tmp_path / "onnx"
    assert cli_main(["export", "onnx", str(tiny_artifact), "--out", str(out), "--parity-limit", "8",
                     "--knn-limit", "0"]) == 0
    assert cli_main(["export", "tensorrt", str(out / "model_56.onnx"), "--out", str(out)]) == 0
    trt_backend = TensorRTBackend.from_path(out / "model_56.onnx", device="cuda")
    ort_backend = OnnxRuntimeBackend(out)
    x = torch.stack([ort_backend.pre(decode_image(b)) for b in sample_bytes[:40]])
    a, b = trt_backend.core(x), ort_backend.core(x)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.mean, b.mean, atol=1e-3, rtol=1e-3)
