"""The batching engine on its own: dynamic batching, ordering, admission control, deadlines, failures."""

from __future__ import annotations

import asyncio

import pytest
import numpy as np
import torch
from PIL import Image

from dinoforge.core.preprocess import PreprocessConfig, decode_image
from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.engine import BatchingEngine
from dinoforge.serve.errors import DeadlineExceeded, InferenceFailed, InvalidInput, Overloaded, PayloadTooLarge
from tests.serve.helpers import encode, png_header


def _reference(backend: FakeBackend, data: bytes) -> torch.Tensor:
    """CLS feature of one image computed alone (no batching)."""
    x = backend.pre(decode_image(data))[None]
    return torch.from_numpy(backend.core(x).cls[0])


def _run(coro):
    return asyncio.run(coro)


async def _with_engine(backend: FakeBackend, body, **kwargs):
    engine = BatchingEngine(backend, **kwargs)
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.stop()


def test_concurrent_requests_share_batches_and_keep_their_own_results(sample_bytes: list[bytes]) -> None:
    backend = FakeBackend(delay_s=0.05)
    images = sample_bytes[:8]

    async def body(engine: BatchingEngine):
        return await asyncio.gather(*(engine.submit([img], timeout_s=10) for img in images))

    results = _run(_with_engine(backend, body, max_batch_size=8, max_queue_delay_s=0.2))
    assert max(backend.batch_sizes) > 1, backend.batch_sizes  # requests were batched together
    assert sum(backend.batch_sizes) == 8
    for img, res in zip(images, results, strict=True):
        torch.testing.assert_close(torch.from_numpy(res.rows[0].cls[0]), _reference(FakeBackend(), img))
        assert res.timing["inference_ms"] >= 50.0 and res.timing["queue_ms"] >= 0.0


def test_batches_never_exceed_max_batch_size_and_order_is_kept(sample_bytes: list[bytes]) -> None:
    backend = FakeBackend()
    images = sample_bytes[:20]

    async def body(engine: BatchingEngine):
        return await engine.submit(images, timeout_s=10)

    res = _run(_with_engine(backend, body, max_batch_size=8, max_queue_delay_s=0.01))
    assert max(backend.batch_sizes) <= 8 and sum(backend.batch_sizes) == 20
    ref = FakeBackend()
    for img, row in zip(images, res.rows, strict=True):
        torch.testing.assert_close(torch.from_numpy(row.cls[0]), _reference(ref, img))


def test_images_of_different_sizes_are_batched_by_shape() -> None:
    pre = PreprocessConfig(mode="patch_multiple", size=28, resize_size=None, patch_size=7)
    backend = FakeBackend(preprocessing=pre)
    sizes = [(40, 40), (80, 40), (40, 40), (40, 80), (80, 40)]
    images = [encode(Image.new("RGB", s, (i * 40, 255 - i * 40, 90))) for i, s in enumerate(sizes)]

    async def body(engine: BatchingEngine):
        return await engine.submit(images, timeout_s=10)

    res = _run(_with_engine(backend, body, max_batch_size=8, max_queue_delay_s=0.05))
    assert sorted(backend.batch_sizes) == [1, 2, 2]  # one batch per input shape
    assert [tuple(s) for s in res.sizes] == [(28, 28), (28, 56), (28, 28), (56, 28), (28, 56)]  # (H, W)
    ref = FakeBackend(preprocessing=pre)
    for img, row in zip(images, res.rows, strict=True):
        torch.testing.assert_close(torch.from_numpy(row.cls[0]), _reference(ref, img))


def test_full_queue_answers_overloaded_with_retry_after(sample_bytes: list[bytes]) -> None:
    backend = FakeBackend(delay_s=0.3)

    async def body(engine: BatchingEngine):
        first = asyncio.create_task(engine.submit(sample_bytes[:4], timeout_s=10))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as err:
            await engine.submit(sample_bytes[4:6], timeout_s=10)
        await first
        assert engine.pending == 0
        return err.value

    err = _run(_with_engine(backend, body, max_batch_size=4, max_queue_size=5))
    assert err.retry_after >= 1 and err.headers["Retry-After"] == str(err.retry_after)
    assert "busy" in err.message


def test_deadline_exceeded_and_engine_recovers(sample_bytes: list[bytes]) -> None:
    backend = FakeBackend(delay_s=0.3)

    async def body(engine: BatchingEngine):
        with pytest.raises(DeadlineExceeded):
            await engine.submit(sample_bytes[:2], timeout_s=0.05)
        ok = await engine.submit(sample_bytes[:1], timeout_s=10)
        assert engine.pending == 0
        return ok

    res = _run(_with_engine(backend, body, max_batch_size=4))
    assert len(res.rows) == 1


def test_bad_images_fail_their_request_only(sample_bytes: list[bytes]) -> None:
    backend = FakeBackend()

    async def body(engine: BatchingEngine):
        with pytest.raises(InvalidInput, match=r"input\[1\]"):
            await engine.submit([sample_bytes[0], b"definitely not an image"], timeout_s=10)
        with pytest.raises(PayloadTooLarge, match=r"input\[0\].*pixels"):
            await engine.submit([png_header(40000, 40000)], timeout_s=10)
        assert engine.pending == 0
        return await engine.submit(sample_bytes[:3], timeout_s=10)

    assert len(_run(_with_engine(backend, body, max_pixels=1_000_000)).rows) == 3


def test_backend_failure_becomes_inference_failed_and_engine_keeps_serving(sample_bytes: list[bytes]) -> None:
    class Flaky(FakeBackend):
        calls = 0

        def core(self, pixels: np.ndarray):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("simulated runtime fault")
            return super().core(pixels)

    async def body(engine: BatchingEngine):
        with pytest.raises(InferenceFailed, match="simulated runtime fault"):
            await engine.submit(sample_bytes[:1], timeout_s=10)
        return await engine.submit(sample_bytes[:2], timeout_s=10)

    assert len(_run(_with_engine(Flaky(), body)).rows) == 2
