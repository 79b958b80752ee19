"""Triton integration: `dinoforge export triton` repository -> real tritonserver -> `dinoforge serve --backend
triton` in front of it (HTTP and gRPC) -> embeddings equal to the local torch backend."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from dinoforge.core.cli import build_parser
from dinoforge.core.cli import main as cli_main
from dinoforge.serve.backends import create_backend
from dinoforge.serve.cli import settings_from_args
from dinoforge.serve.errors import BackendError
from dinoforge.serve.server import BackgroundServer, free_port
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def triton(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory, sample_images_dir: Path):
    from dinoforge.export.triton_server import DEFAULT_VENV, TritonServer

    if not (DEFAULT_VENV / "bin" / "python").is_file():
        pytest.skip(f"{DEFAULT_VENV} missing: run `make triton-env` (make test creates it)")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    assert cli_main(["export", "triton", str(tiny_artifact), "--repo", str(repo), "--name", "tiny",
                     "--backend", "python", "--max-batch-size", "8", "--preferred-batch-sizes", "4,8",
                     "--parity-images", str(sample_images_dir), "--parity-limit", "8", "--knn-limit", "0"]) == 0
    with TritonServer(repo, models=["tiny"]) as server:
        yield server, repo / "tiny"


@pytest.fixture(scope="module")
def local_reference(tiny_artifact: Path, sample_bytes: list[bytes]) -> dict:
    payload = {"input": [b64(b) for b in sample_bytes[:20]], "pooling": "cls+mean"}
    with BackgroundServer(ServeSettings(port=0, model=tiny_artifact)) as server:
        body = httpx.post(server.url + "/v1/embeddings", json=payload, timeout=60).json()
    return {"payload": payload, "vectors": np.array([d["embedding"] for d in body["data"]])}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_serve_in_front_of_triton_equals_local_backend(triton, local_reference: dict, protocol: str) -> None:
    server, model_dir = triton
    url = server.url if protocol == "http" else f"127.0.0.1:{server.grpc_port}"
    # the options exactly as `dinoforge serve --backend triton ...` parses them
    args = build_parser().parse_args(["serve", "--backend", "triton", "--triton-url", url, "--triton-model", "tiny",
                                      "--triton-protocol", protocol, "--model", str(model_dir),
                                      "--max-batch-size", "16", "--port", "0"])
    settings = settings_from_args(args)
    with BackgroundServer(settings) as front, httpx.Client(base_url=front.url, timeout=60) as client:
        ready = client.get("/ready").json()
        assert ready["backend"] == "triton" and ready["max_batch_size"] == 16
        r = client.post("/v1/embeddings", json=local_reference["payload"])  # 20 images: Triton batches of <= 8
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, local_reference["vectors"], atol=1e-5)
        bad = client.post("/v1/embeddings", json={"input": b64(b"not an image")})
        assert bad.status_code == 422


def test_triton_backend_errors_are_clear(triton) -> None:
    server, model_dir = triton
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="cannot reach Triton|not ready"):
        create_backend(ServeSettings(backend="triton", triton_url=dead, triton_model="tiny", model=model_dir))
    with pytest.raises(BackendError, match="no ready model 'nope'"):
        create_backend(ServeSettings(backend="triton", triton_url=server.url, triton_model="nope", model=model_dir))
