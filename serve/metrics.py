"""Prometheus metrics of one app (own registry, so several apps in one process never collide)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ImageRate:
    """Images per second over a sliding window (what a dashboard wants next to the counter)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), n))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class ServeMetrics:
    """Every metric the server exports under ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dinoforge_requests", "HTTP requests", ["route", "method", "code"], registry=r)
        self.errors = Counter("dinoforge_request_errors", "HTTP responses with status >= 400", ["route", "code"],
                              registry=r)
        self.request_latency = Histogram("dinoforge_request_seconds", "HTTP request latency", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dinoforge_queue_depth", "images admitted and not yet answered", registry=r)
        self.batch_size = Histogram("dinoforge_batch_size", "images per inference batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_latency = Histogram("dinoforge_queue_seconds", "wait between preprocessing and inference",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.preprocess_latency = Histogram("dinoforge_preprocess_seconds", "decode + preprocess per image",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("dinoforge_inference_seconds", "backend time per batch",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("dinoforge_images", "images embedded", registry=r)
        self.rejected = Counter("dinoforge_rejected_images", "images refused by admission control", ["reason"],
                                registry=r)
        self._rate = ImageRate()
        Gauge("dinoforge_images_per_second", "images embedded per second (10 s window)",
              registry=r).set_function(self._rate.rate)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one inference batch."""
        self.batch_size.observe(size)
        self.inference_latency.observe(seconds)
        self.images.inc(size)
        self._rate.add(size)

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        """Record one HTTP response."""
        self.requests.labels(route=route, method=method, code=str(code)).inc()
        self.request_latency.labels(route=route).observe(seconds)
        if code >= 400:
            self.errors.labels(route=route, code=str(code)).inc()

    def render(self) -> tuple[bytes, str]:
        """Body and content type of the ``/metrics`` response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
