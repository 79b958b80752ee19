"""The Python clients (sync and async) against a real server: inputs, batching, order, retries, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import decode_image
from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.client import AsyncDinoforgeClient, ClientError, DinoforgeClient
from dinoforge.core.pooling import Pooling
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import encode


def _expected(files: list[Path], pooling: Pooling = "cls") -> np.ndarray:
    backend = FakeBackend()
    x = np.stack([backend.pre(decode_image(p)) for p in files])
    return backend.post(backend.core(x), PoolingOptions(pooling=pooling))


def test_sync_client_embeds_folders_files_and_pil_images_in_order(fake_server: BackgroundServer,
                                                                  sample_images_dir: Path,
                                                                  sample_files: list[Path]) -> None:
    with DinoforgeClient(fake_server.url, batch_size=7) as client:
        assert client.health() == {"status": "ok"} and client.ready()["backend"] == "fake"
        emb = client.embed(sample_images_dir, pooling="mean", progress=True)
        assert emb.names == [str(p) for p in sample_files] and emb.vectors.shape == (100, 16)
        np.testing.assert_allclose(emb.vectors, _expected(sample_files, "mean"), atol=1e-5)
        assert len(emb.timings) == 15  # ceil(100 / 7) requests
        pil = [Image.open(p) for p in sample_files[:3]]
        mixed = client.embed([sample_files[0], pil[1], sample_files[2].read_bytes()], return_patch_tokens=True)
        np.testing.assert_allclose(mixed.vectors, _expected(sample_files[:3]), atol=1e-5)
        assert mixed.patch_tokens is not None and [p.shape for p in mixed.patch_tokens] == [(16, 16)] * 3
        truncated = client.embed(sample_files[0], dimensions=4, normalize=False)
        assert truncated.vectors.shape == (1, 4)


def test_async_client_keeps_order_with_concurrent_batches(fake_server: BackgroundServer,
                                                          sample_files: list[Path]) -> None:
    async def go() -> tuple:
        async with AsyncDinoforgeClient(fake_server.url, batch_size=5, concurrency=4) as client:
            emb = await client.embed(sample_files[:40])
            with pytest.raises(ClientError) as err:
                await client.embed([b"not an image"])
            return emb, err.value, await client.health()

    emb, err, health = asyncio.run(go())
    np.testing.assert_allclose(emb.vectors, _expected(sample_files[:40]), atol=1e-5)
    assert err.status == 422 and "not a decodable image" in str(err)
    assert health == {"status": "ok"}


def test_client_index_search_delete_and_classify_errors(tmp_path: Path, sample_files: list[Path]) -> None:
    settings = ServeSettings(port=0, index_dir=tmp_path / "index")
    with BackgroundServer(settings, backend=FakeBackend()) as server, DinoforgeClient(server.url, batch_size=4) as c:
        ids = c.index(sample_files[:10], metadata=[{"k": i} for i in range(10)])
        assert ids == [str(p) for p in sample_files[:10]]
        hits = c.search(sample_files[2:4], top_k=3)
        assert [h[0]["id"] for h in hits] == ids[2:4] and hits[0][0]["metadata"] == {"k": 2}
        assert c.delete(ids[2]) == 9  # ids with slashes survive the URL
        with pytest.raises(ClientError, match="not in the index") as err:
            c.delete(ids[2])
        assert err.value.status == 404
        with pytest.raises(ClientError, match="no classification head"):
            c.classify(sample_files[0])

    async def go() -> list[str]:
        with BackgroundServer(settings, backend=FakeBackend()) as server:
            async with AsyncDinoforgeClient(server.url) as ac:
                assert (await ac.search(sample_files[3], top_k=1))[0][0]["id"] == str(sample_files[3])
                await ac.delete(str(sample_files[3]))
                return await ac.index([sample_files[11]], ids=["eleven"])

    assert asyncio.run(go()) == ["eleven"]


def test_client_retries_after_429(sample_files: list[Path]) -> None:
    settings = ServeSettings(port=0, max_images_per_request=4, max_queue_size=4, max_batch_size=4)
    with BackgroundServer(settings, backend=FakeBackend(delay_s=0.3)) as server:
        async def go() -> list:
            async with AsyncDinoforgeClient(server.url, batch_size=4, concurrency=3, retries=20) as client:
                return (await client.embed(sample_files[:12])).vectors  # 3 requests, room for one at a time

        vectors = asyncio.run(go())
        rejected = server.state.metrics.registry.get_sample_value("dinoforge_rejected_images_total",
                                                                  {"reason": "queue_full"})
    np.testing.assert_allclose(vectors, _expected(sample_files[:12]), atol=1e-5)
    assert rejected is not None and rejected > 0  # some requests were refused with 429 and retried


def test_client_input_errors(fake_server: BackgroundServer, tmp_path: Path) -> None:
    with DinoforgeClient(fake_server.url) as client:
        with pytest.raises(DataError, match="does not exist"):
            client.embed(tmp_path / "missing.png")
        with pytest.raises(DataError, match="holds no images"):
            client.embed(tmp_path)
        with pytest.raises(ValueError, match="ids"):
            client.index([encode(Image.new("RGB", (8, 8)))], ids=["a", "b"])
    with DinoforgeClient("http://127.0.0.1:9", timeout=2) as dead, pytest.raises(ClientError, match="cannot reach"):
        dead.health()
