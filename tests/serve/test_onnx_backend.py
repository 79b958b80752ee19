"""The ONNX Runtime backend on graphs written by `dinoforge export onnx` (the export engineer's contract)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from dinoforge.core.artifact import load_artifact
from dinoforge.core.cli import main as cli_main
from dinoforge.core.errors import ArtifactError
from dinoforge.core.preprocess import decode_image, preprocess_image
from dinoforge.serve.backends import create_backend
from dinoforge.serve.backends.onnx_backend import OnnxRuntimeBackend
from dinoforge.core.pooling import Pooling
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64

pytestmark = pytest.mark.slow  # two real exports with parity checks


@pytest.fixture(scope="module")
def exports(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 float-input export at 56 and 84 px with patch tokens; uint8-input export at 56 px without."""
    root = tmp_path_factory.mktemp("onnx")
    common = ["--parity-limit", "8", "--knn-limit", "0"]
    assert cli_main(["export", "onnx", str(tiny_artifact), "--out", str(root / "float"), "--patch-tokens",
                     "--resolutions", "56,84", *common]) == 0
    assert cli_main(["export", "onnx", str(tiny_artifact), "--out", str(root / "uint8"), "--embed-preprocessing",
                     *common]) == 0
    return {"float": root / "float", "uint8": root / "uint8"}


def _torch_features(art, images: list[bytes], pre) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.stack([preprocess_image(decode_image(b), pre) for b in images])
    with torch.inference_mode():
        out = art.backbone.forward_dino(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1), out["x_norm_patchtokens"]


@pytest.mark.parametrize("kind,min_cos", [("float", 0.99999), ("uint8", 0.9995)])
def test_backend_matches_the_artifact(exports: dict[str, Path], tiny_artifact: Path, sample_bytes: list[bytes],
                                      kind: str, min_cos: float) -> None:
    art = load_artifact(tiny_artifact)
    backend = create_backend(ServeSettings(model=exports[kind]))  # auto -> onnxruntime
    assert isinstance(backend, OnnxRuntimeBackend) and backend.contract.resolution == 56
    assert backend.has_patch_tokens == (kind == "float")
    images = sample_bytes[::5]
    feats = backend.core(np.stack([backend.pre(decode_image(b)) for b in images]))
    cls, mean, patch = _torch_features(art, images, art.card.preprocessing)
    poolings: tuple[Pooling, ...] = ("cls", "mean", "cls+mean")
    for pooling in poolings:
        got = torch.from_numpy(backend.post(feats, PoolingOptions(pooling=pooling)))
        want = F.normalize(torch.cat([cls, mean], -1) if pooling == "cls+mean" else
                           (cls if pooling == "cls" else mean), dim=-1)
        assert float((got * want).sum(-1).min()) >= min_cos, pooling
    if kind == "float":
        torch.testing.assert_close(torch.from_numpy(feats.patch), patch, atol=1e-4, rtol=1e-4)


def test_second_resolution_uses_the_scaled_contract(exports: dict[str, Path], tiny_artifact: Path,
                                                    sample_bytes: list[bytes]) -> None:
    art = load_artifact(tiny_artifact)
    backend = OnnxRuntimeBackend(exports["float"], resolution=84)
    pre = backend.info.preprocessing
    assert (pre.mode, pre.size, pre.resize_size) == ("center_crop", 84, 96)  # same 64/56 crop ratio
    images = sample_bytes[40:60]
    feats = backend.core(np.stack([backend.pre(decode_image(b)) for b in images]))
    cls, _, patch = _torch_features(art, images, pre)
    torch.testing.assert_close(torch.from_numpy(feats.cls), cls, atol=1e-4, rtol=1e-4)
    assert feats.patch is not None and feats.patch.shape[1] == 36 == patch.shape[1]
    with pytest.raises(ArtifactError, match="no graph at resolution 112"):
        OnnxRuntimeBackend(exports["float"], resolution=112)


def test_graph_without_dinoforge_metadata_is_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    model = onnx.load(str(exports["float"] / "model_56.onnx"))
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    with pytest.raises(ArtifactError, match="no dinoforge export metadata"):
        OnnxRuntimeBackend(plain)
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ArtifactError, match="cannot load"):
        OnnxRuntimeBackend(tmp_path / "garbage.onnx")


@pytest.fixture(scope="module")
def onnx_server(exports: dict[str, Path]) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeSettings(port=0, model=exports["float"], max_batch_size=8)) as server:
        yield server


def test_server_on_onnxruntime_equals_torch_server(onnx_server: BackgroundServer, tiny_artifact: Path,
                                                   exports: dict[str, Path], sample_bytes: list[bytes]) -> None:
    payload = {"input": [b64(b) for b in sample_bytes[:20]], "pooling": "cls+mean", "return_patch_tokens": True}
    with BackgroundServer(ServeSettings(port=0, model=tiny_artifact)) as torch_server:
        want = httpx.post(torch_server.url + "/v1/embeddings", json=payload, timeout=60).json()
    got = httpx.post(onnx_server.url + "/v1/embeddings", json=payload, timeout=60).json()
    assert httpx.get(onnx_server.url + "/ready").json()["backend"] == "onnxruntime"
    for g, w in zip(got["data"], want["data"], strict=True):
        np.testing.assert_allclose(g["embedding"], w["embedding"], atol=1e-5)
        np.testing.assert_allclose(g["patch_tokens"], w["patch_tokens"], atol=1e-4)
        assert g["patch_grid"] == w["patch_grid"] == [4, 4]
    with BackgroundServer(ServeSettings(port=0, model=exports["uint8"])) as u8:
        r = httpx.post(u8.url + "/v1/embeddings", json={"input": b64(sample_bytes[0]), "return_patch_tokens": True})
        assert r.status_code == 422 and "without patch tokens" in r.json()["error"]["message"]
