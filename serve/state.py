"""The per-app state shared by the routes: settings, backend, engine, head, index, readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request

from dinoforge.serve.backends.base import Backend, Features
from dinoforge.serve.engine import BatchingEngine, EngineResult
from dinoforge.serve.errors import InvalidInput, NotFound, NotReady
from dinoforge.serve.metrics import ServeMetrics
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.settings import ServeSettings

if TYPE_CHECKING:  # both load only when a server has a head / an index (torch / faiss: not on the edge path)
    from dinoforge.serve.heads import ClassificationHead
    from dinoforge.serve.index_store import IndexStore

TIMEOUT_HEADER = "x-request-timeout"


@dataclass
class ServerState:
    """Everything a request handler needs (``request.app.state.serve``)."""

    settings: ServeSettings
    metrics: ServeMetrics
    backend: Backend | None = None
    engine: BatchingEngine | None = None
    head: ClassificationHead | None = None
    index: IndexStore | None = None
    ready: bool = False
    load_error: str | None = None
    owns_backend: bool = True
    preloaded: bool = False  # backend, head and index were loaded before the app was created
    started: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.backend.info.name if self.backend else (self.settings.model_name or "")

    def require_ready(self) -> tuple[Backend, BatchingEngine]:
        """The backend and engine, or 503 while loading / warming up."""
        if not self.ready or self.backend is None or self.engine is None:
            raise NotReady(self.load_error or "model is loading or warming up; retry shortly")
        return self.backend, self.engine

    def check_model(self, name: str | None) -> None:
        """404 when a request names another model than the one served."""
        if name is not None and name != self.model_name:
            raise NotFound(f"model {name!r} is not served here (this server serves {self.model_name!r})")

    def timeout_s(self, request: Request) -> float:
        """The request's deadline: ``X-Request-Timeout`` seconds (may only shorten the server default)."""
        raw = request.headers.get(TIMEOUT_HEADER)
        default = self.settings.request_timeout_s
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise InvalidInput(f"header X-Request-Timeout must be a number of seconds, got {raw!r}") from None
        if not value > 0:
            raise InvalidInput(f"header X-Request-Timeout must be positive, got {raw!r}")
        return min(value, default)

    async def embed(self, request: Request, images: list[bytes]) -> EngineResult:
        """Run images through the engine with the request's deadline."""
        _, engine = self.require_ready()
        return await engine.submit(images, timeout_s=self.timeout_s(request))

    def pooled(self, result: EngineResult, options: PoolingOptions) -> np.ndarray:
        """Pooled ``[n, D']`` float32 vectors of an engine result."""
        backend, _ = self.require_ready()
        return backend.post(Features.cat(result.rows), options)


def get_state(request: Request) -> ServerState:
    """The app's :class:`ServerState`."""
    return request.app.state.serve
