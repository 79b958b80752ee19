"""Fixtures of the serving tests: real images and real servers (uvicorn on free ports, httpx clients)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings


@pytest.fixture(scope="session")
def sample_files(sample_images_dir: Path) -> list[Path]:
    """The 100 foolbox sample images (CIFAR 32 px RGB PNG, MNIST/F-MNIST 28 px grey PNG, ImageNet JPEG 512+ px)."""
    return sorted(p for p in sample_images_dir.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.fixture(scope="session")
def sample_bytes(sample_files: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in sample_files]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[BackgroundServer]:
    """A real uvicorn server with the fast fake backend and tight limits for the error sweep."""
    settings = ServeSettings(port=0, max_images_per_request=16, max_queue_size=64, max_payload_bytes=2_000_000,
                             max_pixels=1_000_000, max_batch_size=8)
    with BackgroundServer(settings, backend=FakeBackend()) as server:
        yield server


@pytest.fixture()
def fake_client(fake_server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=30) as client:
        yield client
