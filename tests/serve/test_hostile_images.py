"""Hostile images against a real server: thin images, pixel budgets, decode starvation, leaky messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64, encode

CROP = PreprocessConfig(mode="center_crop", size=56, resize_size=64, patch_size=14)


@pytest.fixture(scope="module")
def crop_server() -> Iterator[BackgroundServer]:
    """Fake backend with a centre-crop contract (thin images grow with it), tight request pixel budget."""
    settings = ServeSettings(port=0, max_request_pixels=40_000_000, large_image_pixels=1_000_000,
                             preprocess_workers=2, max_batch_size=8)
    with BackgroundServer(settings, backend=FakeBackend(preprocessing=CROP)) as server:
        yield server


def _embed(url: str, images: list[bytes], timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": [b64(x) for x in images]}, timeout=timeout)


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (1, 2000), (2000, 1)], ids=str)
def test_thin_images_are_413_not_500(crop_server: BackgroundServer, size: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", size, (9, 9, 9)))
    assert len(data) < 1000
    r = _embed(crop_server.url, [encode(Image.new("RGB", (40, 30))), data])
    assert r.status_code == 413, r.text
    assert "input[1]" in r.json()["error"]["message"] and "aspect ratio" in r.json()["error"]["message"]
    assert _embed(crop_server.url, [encode(Image.new("RGB", (40, 30)))]).status_code == 200


def test_request_pixel_budget_is_413_before_decoding(crop_server: BackgroundServer) -> None:
    big = encode(Image.new("RGB", (4000, 4000)))  # 16 Mpx of PNG: three of them are over the 40 Mpx budget
    t0 = time.perf_counter()
    r = _embed(crop_server.url, [big, big, big])
    assert r.status_code == 413 and "split the request" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 1.0  # refused on the headers: nothing was decoded
    assert _embed(crop_server.url, [big, big]).status_code == 200


def test_a_request_of_huge_images_does_not_starve_small_ones(crop_server: BackgroundServer) -> None:
    big = encode(Image.new("RGB", (2000, 2000)))  # 4 Mpx each: decoded on the one "large" thread
    small = encode(Image.new("RGB", (40, 30), (50, 60, 70)))
    done: dict[str, float] = {}

    def heavy() -> None:
        t0 = time.perf_counter()
        assert _embed(crop_server.url, [big] * 8).status_code == 200
        done["heavy"] = time.perf_counter() - t0

    thread = threading.Thread(target=heavy)
    thread.start()
    time.sleep(0.1)  # the heavy request holds the decoders now
    latencies = []
    while thread.is_alive() and len(latencies) < 20:
        t0 = time.perf_counter()
        assert _embed(crop_server.url, [small]).status_code == 200
        latencies.append(time.perf_counter() - t0)
    thread.join()
    assert latencies, "the heavy request finished before any small one was sent"
    # before the large-image lane, a small request queued behind the big decodes (0.69 s of a 0.84 s request)
    assert max(latencies) < 0.5 * done["heavy"], (latencies, done)


def test_decode_errors_never_show_object_addresses(crop_server: BackgroundServer) -> None:
    for junk in (b"\x00" * 64, b"GIF89a" + b"\x01" * 20, encode(Image.new("RGB", (50, 50)))[:60]):
        r = _embed(crop_server.url, [junk])
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "0x" not in message and "object at" not in message, message


def test_mutated_tiffs_are_422_not_500(crop_server: BackgroundServer) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    original = encode(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), "TIFF")
    statuses = set()
    for _ in range(60):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), size=3):
            data[pos] = int(rng.integers(0, 256))
        statuses.add(_embed(crop_server.url, [bytes(data)]).status_code)
    assert statuses <= {200, 413, 422}, statuses
