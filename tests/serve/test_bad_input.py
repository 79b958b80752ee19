"""The bad-input sweep against a real uvicorn server: every error code with a reason, and the server stays up.

Uses the fast fake backend (the transport and limits are what is tested here; real backends have their own
tests). Limits of the ``fake_server`` fixture: 16 images per request, 2 MB bodies, 1 Mpx per image.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64, encode, png_header


def _error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert "Traceback" not in response.text
    body = response.json()["error"]
    assert body["code"] == status and body["message"]
    for fragment in fragments:
        assert fragment.lower() in body["message"].lower(), body["message"]
    return body["message"]


def _embed(client: httpx.Client, inputs: list[str] | str, **extra: object) -> httpx.Response:
    return client.post("/v1/embeddings", json={"input": inputs, **extra})


def test_bad_images_are_422_with_the_failing_index(fake_client: httpx.Client, sample_bytes: list[bytes]) -> None:
    good = b64(sample_bytes[0])
    png = sample_bytes[0]
    jpeg = encode(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG")
    cases = {
        "truncated png": (b64(png[: len(png) // 2]), "input[1]"),
        "truncated jpeg": (b64(jpeg[: len(jpeg) // 3]), "input[1]"),
        "zero bytes": ("", "empty"),
        "not an image": (b64(b"hello, I am a text file\n" * 20), "not a decodable image"),
        "malformed base64": ("%%%not-base64%%%", "base64"),
        "bad padding": ("QUJD" + "A", "base64"),
        "url": ("https://example.com/cat.jpg", "URLs are not fetched"),
        "file url": ("file:///etc/passwd", "URLs are not fetched"),
        "text data uri": ("data:text/plain;base64," + b64(b"hi"), "media type"),
        "non-base64 data uri": ("data:image/png," + "abc", "not base64"),
    }
    for name, (bad, reason) in cases.items():
        message = _error(_embed(fake_client, [good, bad]), 422, reason)
        assert "input[1]" in message, (name, message)  # the failing image is named


def test_limits_are_413_with_reasons(fake_client: httpx.Client, sample_bytes: list[bytes]) -> None:
    tiny = b64(encode(Image.new("RGB", (4, 4), (9, 9, 9))))
    _error(_embed(fake_client, [tiny] * 1000), 413, "1000 images", "at most 16")
    _error(_embed(fake_client, [b64(png_header(40000, 40000))]), 413, "input[0]", "pixel")
    _error(_embed(fake_client, [b64(png_header(2000, 1000))]), 413, "2000000", "1000000")
    big = {"input": [b64(b"\x00" * 1_600_000)]}  # ~2.1 MB of JSON
    _error(fake_client.post("/v1/embeddings", json=big), 413, "at most 2000000 bytes")
    upload = [("file", (f"{i}.png", sample_bytes[i], "image/png")) for i in range(17)]  # 17 small files
    _error(fake_client.post("/v1/embeddings/upload", files=upload), 413, "17 images")


def test_chunked_body_over_the_limit_is_413(fake_client: httpx.Client) -> None:
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    response = fake_client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    _error(response, 413, "bytes")


def test_malformed_requests(fake_client: httpx.Client, sample_bytes: list[bytes]) -> None:
    img = b64(sample_bytes[0])
    json_headers = {"content-type": "application/json"}
    _error(fake_client.post("/v1/embeddings", content=b'{"input": [', headers=json_headers), 400, "not valid JSON")
    _error(fake_client.post("/v1/embeddings", content=b"", headers=json_headers), 422, "body is empty")
    _error(fake_client.post("/v1/embeddings", content=img.encode(), headers={"content-type": "text/plain"}), 415,
           "application/json")
    _error(fake_client.post("/v1/embeddings", files=[("file", ("a.png", sample_bytes[0], "image/png"))]), 415)
    _error(fake_client.post("/v1/embeddings/upload", json={"input": img}), 415, "multipart/form-data")
    _error(_embed(fake_client, img, poolling="cls"), 422, "unknown field", "poolling")
    _error(fake_client.post("/v1/embeddings", json={"images": [img]}), 422, "missing field", "input")
    _error(_embed(fake_client, 5), 422, "input")
    _error(_embed(fake_client, []), 422, "empty")
    _error(_embed(fake_client, img, pooling="max"), 422, "pooling")
    _error(_embed(fake_client, img, dimensions=17), 422, "dimensions=17", "16")
    _error(_embed(fake_client, img, encoding_format="int8"), 422, "encoding_format")
    _error(_embed(fake_client, img, model="another-model"), 404, "not served")
    _error(fake_client.post("/v1/embeddings/upload", files=[("file", ("a.png", b"", "image/png"))]), 422, "empty")
    _error(fake_client.post("/v1/embeddings/upload", files=[("file", ("a.png", sample_bytes[0], "image/png"))],
                            data={"colour": "blue"}), 422, "unknown form field")
    _error(fake_client.post("/v1/embeddings/upload", files=[("file", ("a.png", sample_bytes[0], "image/png"))],
                            data={"dimensions": "many"}), 422, "dimensions")
    _error(fake_client.post("/v1/embeddings", json={"input": img},
                            headers={"X-Request-Timeout": "soon"}), 422, "X-Request-Timeout")
    _error(fake_client.get("/v1/embeddings"), 405)
    _error(fake_client.get("/v2/everything"), 404)
    _error(fake_client.post("/v1/classify", json={"input": img}), 404, "no classification head")
    _error(fake_client.post("/v1/search", json={"input": img}), 404, "no retrieval index")
    _error(fake_client.delete("/v1/index/x"), 404, "no retrieval index")


def test_server_stays_healthy_and_counts_errors(fake_client: httpx.Client, sample_bytes: list[bytes]) -> None:
    _error(_embed(fake_client, ["%%%"]), 422)
    _error(_embed(fake_client, [b64(encode(Image.new("L", (4, 4))))] * 1000), 413)
    assert fake_client.get("/health").json() == {"status": "ok"}
    assert fake_client.get("/ready").status_code == 200
    ok = _embed(fake_client, [b64(b) for b in sample_bytes[:3]])
    assert ok.status_code == 200 and len(ok.json()["data"]) == 3
    metrics = fake_client.get("/metrics").text
    assert 'dinoforge_request_errors_total{code="422",route="/v1/embeddings"}' in metrics
    assert 'dinoforge_request_errors_total{code="413",route="/v1/embeddings"}' in metrics
    assert 'dinoforge_requests_total{code="200",method="POST",route="/v1/embeddings"}' in metrics


def test_api_keys_guard_every_route_but_health(sample_bytes: list[bytes]) -> None:
    settings = ServeSettings(port=0, api_keys=["k1-secret", "k2-secret"])
    with BackgroundServer(settings, backend=FakeBackend()) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("POST", "/v1/embeddings"), ("POST", "/v1/search"), ("DELETE", "/v1/index/a"),
                             ("GET", "/no-such-route")]:
            r = c.request(method, path, json={"input": b64(sample_bytes[0])})
            _error(r, 401, "missing API key")
            assert r.headers["www-authenticate"] == "Bearer"
        _error(c.get("/ready", headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
        _error(c.get("/ready", headers={"Authorization": "Basic k1-secret"}), 401)
        for key in ("k1-secret", "k2-secret"):
            r = c.post("/v1/embeddings", json={"input": b64(sample_bytes[0])},
                       headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        metrics = c.get("/metrics", headers={"Authorization": "Bearer k1-secret"}).text
        assert 'code="401"' in metrics


@pytest.fixture()
def slow_server() -> BackgroundServer:
    settings = ServeSettings(port=0, max_images_per_request=2, max_queue_size=2, max_batch_size=2,
                             request_timeout_s=30)
    with BackgroundServer(settings, backend=FakeBackend(delay_s=0.6)) as server:
        yield server


def test_overload_is_429_with_retry_after_and_deadline_is_504(slow_server: BackgroundServer,
                                                              sample_bytes: list[bytes]) -> None:
    images = [b64(b) for b in sample_bytes[:2]]

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/embeddings", json={"input": images}))
            await asyncio.sleep(0.2)
            second = await client.post("/v1/embeddings", json={"input": images})
            return await first, second, await client.get("/health")

    first, second, health = asyncio.run(go())
    assert first.status_code == 200
    _error(second, 429, "busy")
    assert int(second.headers["retry-after"]) >= 1
    assert health.status_code == 200
    with httpx.Client(base_url=slow_server.url, timeout=30) as client:
        _error(client.post("/v1/embeddings", json={"input": images[:1]}, headers={"X-Request-Timeout": "0.1"}),
               504, "deadline")
        time.sleep(0.7)  # the batch already running finishes; the server keeps answering
        assert client.post("/v1/embeddings", json={"input": images[:1]}).status_code == 200


def test_not_ready_is_503_until_warm_up_finishes(sample_bytes: list[bytes]) -> None:
    gate = threading.Event()

    class SlowWarmup(FakeBackend):
        def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
            gate.wait(timeout=30)
            super().warmup(batch_sizes)

    server = BackgroundServer(ServeSettings(port=0), backend=SlowWarmup()).start(wait_ready=False)
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/health").status_code == 200
            r = client.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
            _error(client.post("/v1/embeddings", json={"input": b64(sample_bytes[0])}), 503, "warming up")
            gate.set()
            deadline = time.monotonic() + 10
            while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.post("/v1/embeddings", json={"input": b64(sample_bytes[0])}).status_code == 200
    finally:
        gate.set()
        server.stop()


def test_runtime_fault_is_500_without_traceback_and_server_survives(sample_bytes: list[bytes]) -> None:
    class Faulty(FakeBackend):
        def core(self, pixels):
            if float(pixels.mean()) > 1.5:  # a very bright image trips a (simulated) runtime bug
                raise RuntimeError("simulated kernel failure")
            return super().core(pixels)

    white = b64(encode(Image.new("RGB", (28, 28), (255, 255, 255))))
    with BackgroundServer(ServeSettings(port=0, max_queue_delay_ms=0), backend=Faulty()) as server, \
            httpx.Client(base_url=server.url) as client:
        _error(client.post("/v1/embeddings", json={"input": white}), 500, "inference failed", "simulated")
        assert client.post("/v1/embeddings", json={"input": b64(sample_bytes[0])}).status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
