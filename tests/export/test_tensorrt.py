"""TensorRT: cache keys, profiles and the missing-dependency path (the engine build itself needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import onnx
import pytest

from dinoforge.core.cli import main
from dinoforge.core.errors import ConfigError
from dinoforge.export.tensorrt_build import (Profile, TensorRTBuildConfig, build_engine, cache_key, engine_path,
                                             graph_io, graph_precision, input_profiles)
from dinoforge.export.trt_lint import lint_onnx

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "tensorrt is not installed (needs an NVIDIA GPU; cannot be installed on this machine)"


def _key(**changes: Any) -> str:
    base: dict[str, Any] = {"onnx_sha256": "a" * 64, "trt_version": "10.7.0", "compute_capability": "8.9",
                               "precision": "fp16",
                               "profiles": [Profile("pixel_values", (1, 3, 224, 224), (8, 3, 224, 224),
                                                    (32, 3, 224, 224))]}
    base.update(changes)
    return cache_key(**base)


def test_cache_key_changes_with_every_field() -> None:
    keys = {_key(), _key(onnx_sha256="b" * 64), _key(trt_version="11.0.0"), _key(compute_capability="9.0"),
            _key(precision="fp32"),
            _key(profiles=[Profile("pixel_values", (1, 3, 224, 224), (16, 3, 224, 224), (32, 3, 224, 224))])}
    assert len(keys) == 6 and all(len(k) == 64 for k in keys)
    assert _key() == _key()
    assert engine_path(Path("/e"), Path("m/model_224.onnx"), _key()).name == f"model_224-{_key()[:16]}.plan"


def test_profiles_from_exported_graph(tiny_export: Path, tiny_reg_raw_export: Path) -> None:
    model = onnx.load(str(tiny_export / "model_84.onnx"))
    (profile,) = input_profiles(model, TensorRTBuildConfig(min_batch=1, opt_batch=4, max_batch=16))
    assert profile == Profile("pixel_values", (1, 3, 84, 84), (4, 3, 84, 84), (16, 3, 84, 84))
    raw = onnx.load(str(tiny_reg_raw_export / "model_84.onnx"))
    assert input_profiles(raw, TensorRTBuildConfig())[0].max == (32, 84, 84, 3)
    assert graph_precision(model) == "fp32"
    io = graph_io(raw)
    assert io["inputs"] == [{"name": "pixels", "dtype": "UINT8", "shape": [-1, 84, 84, 3]}]
    assert [o["name"] for o in io["outputs"]] == ["cls_embedding", "mean_embedding", "patch_tokens"]


def test_profile_rejects_dynamic_spatial_axes() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(Exception, match="axis 2 is dynamic"):
        input_profiles(helper.make_model(graph), TensorRTBuildConfig())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        TensorRTBuildConfig(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(ConfigError):
        from dinoforge.core.config import build_config

        build_config(TensorRTBuildConfig, {"max_batch": 0})


def test_consumed_graphs_pass_check_trt(tiny_export: Path, tiny_reg_raw_export: Path) -> None:
    for path in (tiny_export / "model_56.onnx", tiny_reg_raw_export / "model_84.onnx"):
        assert [f for f in lint_onnx(path) if f.severity == "error"] == []


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-dependency path cannot be exercised")
def test_missing_tensorrt_is_a_clear_error(tiny_export: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    assert main(["export", "tensorrt", str(tiny_export / "model_84.onnx"), "--out", str(out)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", "tensorrt", str(tmp_path / "missing.onnx"), "--out", str(out)]) == 2


def test_graph_failing_check_trt_is_refused_before_building(tiny_artifact: Path, tmp_path: Path,
                                                            sample_images_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cpu_int8"
    assert main(["export", "onnx", str(tiny_artifact), "--out", str(out), "--precision", "int8",
                 "--calibration", str(sample_images_dir), "--calibration-limit", "100", "--knn-limit", "0",
                 "--parity-images", str(sample_images_dir), "--parity-limit", "16"]) == 0
    assert main(["export", "tensorrt", str(out / "model_56.onnx"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "fails `dinoforge export check-trt`" in err and "qdq-type" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_build_engine_reuses_cache(tiny_export: Path, tmp_path: Path) -> None:
    cfg = TensorRTBuildConfig(min_batch=1, opt_batch=4, max_batch=8, workspace_mb=512)
    first = build_engine(tiny_export / "model_84.onnx", tmp_path, cfg)
    assert not first.reused and first.engine_path.is_file() and first.parity and first.parity["passed"]
    assert (tmp_path / "timing.cache").is_file()
    second = build_engine(tiny_export / "model_84.onnx", tmp_path, cfg)
    assert second.reused and second.key == first.key
