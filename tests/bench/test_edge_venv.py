"""The torch-free edge install, for real (issue "Edge runtime"): a fresh venv with ``pip install
"dinoforge[edge]"`` from this tree has no torch, torchvision, timm or faiss, stays under 350 MB, and its
``dinoforge serve`` + ``dinoforge embed`` give the embeddings of the torch path within 1e-5 on real images.

pip resolves the edge dependencies from the package index as a device would (a few minutes on the 2-core
machine): slow, and skipped with the reason when no index is reachable.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from edge_env import TRAINING_MODULES, build_edge_venv, dir_bytes, importable

from dinoforge.core.cli import main as cli_main
from dinoforge.core.preprocess import decode_image
from dinoforge.serve.backends.torch_backend import TorchBackend
from dinoforge.serve.pooling import PoolingOptions
from tests.serve.helpers import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MAX_VENV_BYTES = 350e6
NO_INDEX = ("Could not find a version", "No matching distribution", "Failed to establish a new connection",
            "Temporary failure in name resolution", "Network is unreachable")


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edge_venv")
    try:
        return build_edge_venv(root)
    except subprocess.CalledProcessError as err:
        output = f"{err.stdout}\n{err.stderr}"
        if any(sign in output for sign in NO_INDEX):
            pytest.skip(f"pip cannot reach a package index: {output.strip().splitlines()[-1]}")
        raise


@pytest.fixture(scope="module")
def onnx_export(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge_export") / "onnx"
    assert cli_main(["export", "onnx", str(tiny_artifact), "--out", str(out), "--parity-limit", "8",
                     "--knn-limit", "0"]) == 0
    return out


def test_edge_install_has_no_training_stack(edge_python: Path, tmp_path: Path) -> None:
    for module in TRAINING_MODULES:
        assert not importable(edge_python, module), f"{module} is importable in the edge venv"
    assert importable(edge_python, "onnxruntime")
    size = dir_bytes(edge_python.parents[1])
    print(f"edge venv: {size / 1e6:.1f} MB")  # the figure docs/edge.md reports
    assert size <= MAX_VENV_BYTES
    # a training command says which install it needs instead of a traceback
    init = subprocess.run([str(edge_python.parent / "dinoforge"), "init", "test", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert init.returncode == 2 and 'install "dinoforge[train]"' in init.stderr and "Traceback" not in init.stderr


def test_edge_server_and_embed_equal_the_torch_path(edge_python: Path, onnx_export: Path, tiny_artifact: Path,
                                                    sample_images_dir: Path, tmp_path: Path) -> None:
    files = sorted(sample_images_dir.glob("imagenet_*.jpg"))[:10] + sorted(sample_images_dir.glob("*.png"))[::9]
    backend = TorchBackend.from_artifact(tiny_artifact)  # the torch path: torch preprocessing, torch model
    want = backend.post(backend.core(np.stack([backend.pre(decode_image(f)) for f in files])),
                        PoolingOptions(pooling=backend.info.default_pooling, normalize=False))  # [n, D]
    with ServeProcess(["--model", str(onnx_export), "--threads", "1"], python=edge_python) as server:
        ready = httpx.get(server.url + "/ready", timeout=10).json()
        assert ready["backend"] == "onnxruntime"
        body = {"input": [base64.b64encode(f.read_bytes()).decode() for f in files], "normalize": False}
        r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served = np.array([item["embedding"] for item in r.json()["data"]], dtype=np.float32)
        out = tmp_path / "vectors.npy"
        embed = subprocess.run([str(edge_python.parent / "dinoforge"), "embed", *map(str, files), "--server",
                                server.url, "--out", str(out), "--no-normalize", "--no-progress"],
                               capture_output=True, text=True, timeout=300, check=False)
        assert embed.returncode == 0, embed.stderr
    np.testing.assert_allclose(served, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)
