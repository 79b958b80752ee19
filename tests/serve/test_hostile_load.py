"""Slow and numerous clients: head and body deadlines, a connection cap, a memory budget for bodies in flight."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import b64, encode

HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    settings = ServeSettings(port=0, max_connections=24, header_timeout_s=1.0, body_timeout_s=1.0,
                             request_timeout_s=4.0, max_payload_bytes=1_000_000, max_inflight_body_bytes=2_500_000)
    with BackgroundServer(settings, backend=FakeBackend()) as srv:
        yield srv


def _connect(server: BackgroundServer) -> socket.socket:
    sock = socket.create_connection((server.settings.host, server.settings.port), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing (or answering), or None when it sent nothing for ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data or None
    except ConnectionResetError:
        pass
    return data


def _ok(server: BackgroundServer) -> int:
    body = {"input": [b64(encode(Image.new("RGB", (20, 20), (1, 2, 3))))]}
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=30).status_code


def test_trickled_request_heads_are_dropped(server: BackgroundServer) -> None:
    socks = [_connect(server) for _ in range(12)]
    start = time.monotonic()
    for sock in socks:
        sock.sendall(HEAD)
    for _ in range(4):  # one header line every 0.4 s: the head is never complete
        time.sleep(0.4)
        for sock in socks:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
    assert all(_closed_within(sock, 3.0) is not None for sock in socks)
    assert time.monotonic() - start < 6.0
    assert _ok(server) == 200
    for sock in socks:
        sock.close()


def test_connections_beyond_the_cap_get_503_and_are_closed(server: BackgroundServer) -> None:
    idle = [_connect(server) for _ in range(40)]
    time.sleep(0.2)
    answers = [_closed_within(sock, 0.3) for sock in idle[-10:]]
    assert all(a is not None and a.startswith(b"HTTP/1.1 503") for a in answers), answers[:2]
    for sock in idle:
        sock.close()
    time.sleep(0.3)
    assert _ok(server) == 200


def test_stalled_body_is_408(server: BackgroundServer) -> None:
    sock = _connect(server)
    sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
    start = time.monotonic()
    answer = _closed_within(sock, 5.0)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert b"too slow" in answer and time.monotonic() - start < 3.0
    sock.close()


def test_a_byte_every_half_second_still_meets_the_body_deadline(server: BackgroundServer) -> None:
    sock = _connect(server)
    sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n")
    start = time.monotonic()
    answer = None
    while answer is None and time.monotonic() - start < 8:
        sock.sendall(b" ")
        answer = _closed_within(sock, 0.5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - start < 6.0  # request_timeout_s = 4
    sock.close()


def test_bodies_in_flight_share_a_memory_budget(server: BackgroundServer) -> None:
    # two uploads of 0.9 MB declared and half sent hold 1.8 of the 2.5 MB budget: a third is refused at once
    holders = [_connect(server) for _ in range(2)]
    for sock in holders:
        sock.sendall(HEAD + b"Content-Length: 900000\r\n\r\n" + b" " * 400_000)
    time.sleep(0.2)
    third = _connect(server)
    third.sendall(HEAD + b"Content-Length: 900000\r\n\r\n")
    answer = _closed_within(third, 2.0) or b""
    assert answer.startswith(b"HTTP/1.1 429") and b"retry-after" in answer.lower(), answer
    for sock in [*holders, third]:
        sock.close()
    time.sleep(1.5)  # the stalled holders time out and release their share
    assert _ok(server) == 200
