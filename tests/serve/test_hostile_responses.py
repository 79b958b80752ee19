"""Responses have a size limit (a clear 413 before serialising) and a compact binary form for patch tokens."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.client import DinoforgeClient
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64, encode

# 224 px input, 14 px patches: 256 tokens of D=64 per image, as a ViT-S/14 would give (D=384 there)
CONTRACT = PreprocessConfig(mode="resize", size=224, resize_size=None, patch_size=14)
LIMIT = 2_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    settings = ServeSettings(port=0, max_response_bytes=LIMIT, max_batch_size=32)
    with BackgroundServer(settings, backend=FakeBackend(embed_dim=64, preprocessing=CONTRACT)) as srv:
        yield srv


def _tiny(n: int) -> list[str]:
    return [b64(encode(Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)))) for i in range(n)]


def test_huge_patch_token_response_is_413_before_it_is_built(server: BackgroundServer) -> None:
    # 32 tiny images x 256 x 64 floats as JSON lists: ~12 MB of text for a 3 KB request
    r = httpx.post(server.url + "/v1/embeddings", json={"input": _tiny(32), "return_patch_tokens": True},
                   timeout=60)
    assert r.status_code == 413, r.status_code
    message = r.json()["error"]["message"]
    assert "response would be about" in message and "patch_tokens_dtype=float16" in message
    assert len(r.content) < 1000
    assert server.state.metrics.images._value.get() == 0  # refused from the request alone: no inference ran


def test_float16_patch_tokens_are_compact_and_shaped(server: BackgroundServer) -> None:
    body = {"input": _tiny(4), "return_patch_tokens": True}
    full = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    half = httpx.post(server.url + "/v1/embeddings", json={**body, "patch_tokens_dtype": "float16"}, timeout=60)
    assert full.status_code == half.status_code == 200
    assert len(half.content) * 6 < len(full.content)
    item = half.json()["data"][0]
    assert item["patch_shape"] == [256, 64] and item["patch_grid"] == [16, 16]
    assert item["patch_tokens_dtype"] == "float16"
    tokens = np.frombuffer(base64.b64decode(item["patch_tokens"]), dtype="<f2").reshape(256, 64)
    np.testing.assert_allclose(tokens, np.asarray(full.json()["data"][0]["patch_tokens"]), atol=1e-3)
    # the same request that was refused as JSON lists fits as float16 base64
    small = httpx.post(server.url + "/v1/embeddings", json={"input": _tiny(32), "return_patch_tokens": True,
                                                           "encoding_format": "base64",
                                                           "patch_tokens_dtype": "float16"}, timeout=60)
    assert small.status_code == 200 and len(small.content) < LIMIT


def test_client_decodes_float16_patch_tokens(server: BackgroundServer) -> None:
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    with DinoforgeClient(server.url) as client:
        ref = client.embed(images, return_patch_tokens=True)
        client_half = client.request("POST", "/v1/embeddings", json={
            "input": _tiny(1), "return_patch_tokens": True, "patch_tokens_dtype": "float16"})
    assert ref.patch_tokens is not None and ref.patch_tokens[0].shape == (256, 64)
    assert client_half["data"][0]["patch_tokens_dtype"] == "float16"
