"""The batching engine: admission control, a preprocessing pool, dynamic batching and one inference thread.

Flow of a request with ``n`` images::

    admit (n <= free capacity, else 429) -> decode + preprocess in a thread pool (n tasks)
    -> queue (one item per image, with the request's deadline) -> batcher: take the first item, wait up to
    ``max_queue_delay`` for more, up to ``max_batch_size`` images of one shape -> backend.core in the
    inference thread -> resolve every image's future.

The inference thread is a single worker so batches run back to back and never compete for the cores; while
a batch runs, new requests are decoded and queued, so the next batch is ready the moment it finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from dinoforge.serve.backends.base import Backend, Features
from dinoforge.serve.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded, ServeError
from dinoforge.serve.images import check_request_pixels, prepare, probe
from dinoforge.serve.metrics import ServeMetrics

log = logging.getLogger("dinoforge.serve.engine")
T = TypeVar("T")


@dataclass(frozen=True)
class _Done:
    row: Features  # this image's features, a batch of one
    queue_s: float  # wait between preprocessing and the start of its batch
    batch: tuple[float, float]  # (start, seconds) of its batch: identifies it and times it


@dataclass
class _Item:
    pixels: np.ndarray  # [3, H, W]
    future: asyncio.Future[_Done]
    enqueued: float
    deadline: float


@dataclass
class EngineResult:
    """Features of one request's images, in request order, plus where its time went.

    Attributes:
        rows: per-image features, each a batch of one.
        sizes: ``(H, W)`` of each image's model input (the patch grid is ``(H // p, W // p)``).
        timing: ``queue_ms``, ``preprocess_ms``, ``inference_ms``.
    """

    rows: list[Features]
    sizes: list[tuple[int, int]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def stacked(self) -> Features:
        """All rows as one batch (patch tokens only when every image has the same grid)."""
        return Features.cat(self.rows)


class BatchingEngine:
    """Dynamic batching in front of a :class:`Backend`.

    Args:
        backend: the runtime.
        max_batch_size: images per inference call at most.
        max_queue_delay_s: how long a partial batch waits for more images.
        max_queue_size: images admitted at once (preprocessing, queued or running); beyond: 429.
        preprocess_workers: threads for decoding and preprocessing.
        max_pixels: decoded-pixel limit per image.
        max_request_pixels: decoded-pixel budget of one request (all its images; beyond: 413).
        large_image_pixels: images decoding to more pixels than this go to a single "large" decode thread, so
            a request of huge images never holds every worker while small requests wait.
        metrics: where to record queue depth, batch sizes and latencies.
    """

    def __init__(self, backend: Backend, *, max_batch_size: int = 32, max_queue_delay_s: float = 0.002,
                 max_queue_size: int = 512, preprocess_workers: int = 2, max_pixels: int = 64_000_000,
                 max_request_pixels: int = 256_000_000, large_image_pixels: int = 4_000_000,
                 metrics: ServeMetrics | None = None) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_pixels = max_pixels
        self.max_request_pixels, self.large_image_pixels = max_request_pixels, large_image_pixels
        self.metrics = metrics or ServeMetrics()
        self._workers = preprocess_workers
        self._pending = 0  # images admitted and not yet answered
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._large: ThreadPoolExecutor | None = None
        self._infer: ThreadPoolExecutor | None = None
        self._seconds_per_image = 0.0  # running estimate, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the pools and the batcher task (call from the running event loop)."""
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="dinoforge-pre")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="dinoforge-pre-large")
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="dinoforge-infer")
        self._task = asyncio.create_task(self._batch_loop(), name="dinoforge-batcher")

    async def stop(self) -> None:
        """Stop batching and release the threads; requests still queued fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(NotReady("server is shutting down"))
        for pool in (self._pool, self._large, self._infer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        """Images admitted and not yet answered."""
        return self._pending

    async def run_in_inference_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the inference thread (e.g. warm-up), serialised with the batches."""
        assert self._infer is not None, "engine not started"
        return await asyncio.get_running_loop().run_in_executor(self._infer, fn, *args)

    # ------------------------------------------------------------------ requests
    def _admit(self, n: int) -> None:
        if self._pending + n > self.max_queue_size:
            self.metrics.rejected.labels(reason="queue_full").inc(n)
            wait = self._pending * self._seconds_per_image
            raise Overloaded(f"server is busy: {self._pending} images queued, capacity {self.max_queue_size}; "
                             "retry later", retry_after=int(wait) + 1)
        self._pending += n
        self.metrics.queue_depth.set(self._pending)

    def _release(self, n: int) -> None:
        self._pending -= n
        self.metrics.queue_depth.set(self._pending)

    async def submit(self, images: Sequence[bytes], *, timeout_s: float) -> EngineResult:
        """Embed a request's images.

        Args:
            images: encoded image files (any format :func:`~dinoforge.core.preprocess.decode_image` reads).
            timeout_s: deadline, relative to now.

        Raises:
            Overloaded: the queue cannot take ``len(images)`` more images.
            InvalidInput / PayloadTooLarge: an image that cannot be decoded or is too large (names its index),
                or images over the request's pixel budget (checked on their headers, before decoding).
            DeadlineExceeded: the deadline passed first.
        """
        assert self._queue is not None and self._pool is not None, "engine not started"
        start = time.monotonic()
        deadline = start + timeout_s
        costs = [probe(data, i, self.backend, self.max_pixels) for i, data in enumerate(images)]
        check_request_pixels(costs, self.max_request_pixels)
        self._admit(len(images))
        try:
            pixels = await self._preprocess(images, costs, deadline)
            t_pre = time.monotonic()
            futures = []
            for x in pixels:
                fut: asyncio.Future[_Done] = asyncio.get_running_loop().create_future()
                self._queue.put_nowait(_Item(pixels=x, future=fut, enqueued=t_pre, deadline=deadline))
                futures.append(fut)
            results = await self._wait(futures, deadline)
        finally:
            self._release(len(images))
        return EngineResult(rows=[r.row for r in results], sizes=[tuple(x.shape[-2:]) for x in pixels], timing={
            "preprocess_ms": (t_pre - start) * 1e3,
            "queue_ms": max(r.queue_s for r in results) * 1e3,
            "inference_ms": sum(seconds for _, seconds in {r.batch for r in results}) * 1e3,
        })

    async def _preprocess(self, images: Sequence[bytes], costs: list[int], deadline: float) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        pools = [self._large if cost > self.large_image_pixels else self._pool for cost in costs]
        tasks = [loop.run_in_executor(pool, self._prepare_timed, data, i)
                 for i, (data, pool) in enumerate(zip(images, pools, strict=True))]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("request deadline passed while decoding its images") from None
        except ServeError:
            for t in tasks:
                t.cancel()
            raise

    def _prepare_timed(self, data: bytes, index: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = prepare(data, index, self.backend, self.max_pixels)
        self.metrics.preprocess_latency.observe(time.perf_counter() - t0)
        return out

    async def _wait(self, futures: list[asyncio.Future[_Done]], deadline: float) -> list[_Done]:
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # gather cancelled the futures; the batcher skips cancelled items, so no work is wasted.
            raise DeadlineExceeded(f"request deadline passed while waiting for inference "
                                   f"({self._pending} images in the server)") from None

    # ------------------------------------------------------------------ batching
    async def _collect(self) -> list[_Item]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        shape = batch[0].pixels.shape
        limit = time.monotonic() + self.max_queue_delay_s
        held: list[_Item] = []
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except TimeoutError:
                    break
            (batch if item.pixels.shape == shape else held).append(item)
        for item in held:  # other sizes (patch_multiple preprocessing) go back for the next batch
            self._queue.put_nowait(item)
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():
                continue  # its request timed out or was cancelled
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("request deadline passed while queued"))
                continue
            live.append(item)
        return live

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._collect())
            if not batch:
                continue
            start = time.monotonic()
            for item in batch:
                self.metrics.queue_latency.observe(start - item.enqueued)
            pixels = np.stack([item.pixels for item in batch])  # [B, 3, H, W]
            try:
                features = await loop.run_in_executor(self._infer, self.backend.core, pixels)
            except Exception as err:  # noqa: BLE001 - every waiting request must get an answer
                self._fail(batch, err)
                continue
            seconds = time.monotonic() - start
            self.metrics.observe_batch(len(batch), seconds)
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / len(batch)
            for i, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(_Done(features.row(i), start - item.enqueued, (start, seconds)))

    def _fail(self, batch: list[_Item], err: Exception) -> None:
        if not isinstance(err, ServeError):
            log.error("backend failed on a batch of %d images", len(batch), exc_info=err)
            err = InferenceFailed(f"inference failed: {type(err).__name__}: {err}")
        for item in batch:
            if not item.future.done():
                item.future.set_exception(err)
