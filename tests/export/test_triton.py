"""Triton repositories: config.pbtxt validated by Triton's ModelConfig, served by a real tritonserver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dinoforge.core.cli import main
from dinoforge.export.errors import ExportError
from dinoforge.export.triton_repo import TritonModelOptions, validate_config, write_triton_model
from dinoforge.export.triton_server import DEFAULT_VENV

VALID = """
name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
input [{ name: "pixel_values" data_type: TYPE_FP32 dims: [3, 56, 56] }]
output [{ name: "cls_embedding" data_type: TYPE_FP32 dims: [64] }]
dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 50 }
instance_group [{ kind: KIND_CPU count: 2 }]
"""


def test_generated_config_round_trips(tiny_export: Path, tmp_path: Path) -> None:
    opts = TritonModelOptions(max_batch_size=16, preferred_batch_sizes=[4, 8, 64], queue_delay_us=250,
                              instances=2, kind="gpu")
    model_dir = write_triton_model(tiny_export / "model_84.onnx", tmp_path, "tiny", opts)
    assert (model_dir / "1" / "model.onnx").is_file()
    cfg = validate_config(model_dir / "config.pbtxt", model_dir=model_dir)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("tiny", "onnxruntime_onnx", 16)
    assert list(cfg.input[0].dims) == [3, 84, 84]  # batch axis excluded
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("cls_embedding", [64]), ("mean_embedding", [64])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]  # 64 > max_batch_size dropped
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert (cfg.instance_group[0].count, cfg.instance_group[0].kind) == (2, 1)  # KIND_GPU


@pytest.mark.parametrize(("text", "message"), [
    (VALID.replace("max_batch_size: 8", "max_batch_sise: 8"), "not a valid Triton ModelConfig"),
    (VALID.replace("TYPE_FP32 dims: [3", "TYPE_FLOAT32 dims: [3"), "not a valid Triton ModelConfig"),
    (VALID.replace("[3, 56, 56]", "[3, 0, 56]"), "invalid dims"),
    (VALID.replace("[4, 8]", "[4, 16]"), "outside 1..max_batch_size"),
    (VALID.replace("max_batch_size: 8", "max_batch_size: 0"), "dynamic_batching needs max_batch_size > 0"),
    (VALID.replace("count: 2", "count: 0"), "has count 0"),
    (VALID.replace('platform: "onnxruntime_onnx"', ""), "neither platform nor backend"),
])
def test_invalid_configs_rejected(text: str, message: str) -> None:
    validate_config(VALID)
    with pytest.raises(ExportError, match=message):
        validate_config(text)


def test_cli_errors(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path = str(tiny_export / "model_56.onnx")
    assert main(["export", "triton", onnx_path, "--repo", str(tmp_path), "--name", "m", "--backend", "tensorrt"]) == 2
    assert "needs a .plan engine" in capsys.readouterr().err
    assert main(["export", "triton", onnx_path, "--repo", str(tmp_path), "--name", "m"]) == 0
    assert main(["export", "triton", onnx_path, "--repo", str(tmp_path), "--name", "m"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "triton", str(tiny_export.parent), "--repo", str(tmp_path), "--name", "x"]) == 2


@pytest.mark.slow
@pytest.mark.integration
def test_real_tritonserver_serves_python_backend_export(tiny_reg_artifact: Path, tmp_path: Path,
                                                       sample_images_dir: Path) -> None:
    """Artifact -> ONNX (with parity) -> Python-backend repository -> tritonserver -> HTTP inference."""
    if not (DEFAULT_VENV / ".triton-stamp").is_file():
        pytest.skip(f"{DEFAULT_VENV} is missing or incomplete (export/triton_env.sh failed or was not run; "
                    "`make test` runs it)")
    import tritonclient.http as http

    from dinoforge.export.triton_server import TritonServer

    repo = tmp_path / "repo"
    assert main(["export", "triton", str(tiny_reg_artifact), "--repo", str(repo), "--name", "tiny_reg",
                 "--backend", "python", "--resolution", "56", "--max-batch-size", "8",
                 "--preferred-batch-sizes", "4,8", "--parity-images", str(sample_images_dir),
                 "--parity-limit", "16", "--knn-limit", "50"]) == 0
    onnx_path = repo / "tiny_reg" / "1" / "model.onnx"
    x = np.random.default_rng(0).standard_normal((5, 3, 56, 56)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    with TritonServer(repo, models=["tiny_reg"]) as server:
        client = http.InferenceServerClient(server.url)
        assert client.is_model_ready("tiny_reg")
        config = client.get_model_config("tiny_reg")
        assert config["max_batch_size"] == 8 and config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
        inp = http.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("tiny_reg", [inp])
        np.testing.assert_allclose(result.as_numpy("cls_embedding"), ref[0], atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("mean_embedding"), ref[1], atol=1e-6)
        bad = http.InferInput("pixel_values", [1, 3, 28, 28], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
        with pytest.raises(Exception, match="unexpected shape"):
            client.infer("tiny_reg", [bad])
