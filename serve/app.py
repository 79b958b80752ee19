"""The app factory: ``create_app(settings)`` -> a FastAPI app with lifespan loading and warm-up.

Layers (infinity / TEI style): transport (routers, pydantic models, middlewares) -> batching engine ->
backend. Startup loads the backend (unless one is passed in), starts the engine, opens the head and the
index; warm-up runs in the background so ``/health`` answers at once and ``/ready`` turns 200 after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI

from dinoforge.core import __version__
from dinoforge.core.errors import ArtifactError, DinoforgeError
from dinoforge.core.pooling import pooled_dim
from dinoforge.serve.backends import create_backend
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.engine import BatchingEngine
from dinoforge.serve.metrics import ServeMetrics
from dinoforge.serve.middleware import AllowMiddleware, AuthMiddleware, GuardMiddleware, MetricsMiddleware
from dinoforge.serve.responses import install_error_handlers
from dinoforge.serve.routes import classify, embeddings, health, page, query, retrieval
from dinoforge.serve.settings import ServeSettings
from dinoforge.serve.state import ServerState

if TYPE_CHECKING:  # loaded only for a server with a head (torch) or an index (faiss): see load_resources
    from dinoforge.serve.heads import ClassificationHead
    from dinoforge.serve.index_store import IndexStore

log = logging.getLogger("dinoforge.serve")

JSON_ROUTES = ("/v1/embeddings", "/v1/classify", "/v1/index", "/v1/search")
UPLOAD_ROUTES = ("/v1/embeddings/upload", "/v1/query", "/v1/pca")


@dataclass
class Resources:
    """What a server loads before it can answer: the backend, the optional head and index."""

    backend: Backend
    head: ClassificationHead | None = None
    index: IndexStore | None = None


def load_resources(settings: ServeSettings, backend: Backend | None = None) -> Resources:
    """Load the model (unless given), the classification head and the retrieval index of ``settings``.

    Raises:
        DinoforgeError: with a message naming the bad option (the CLI calls this before binding the port).
    """
    backend = backend or create_backend(settings)
    res = Resources(backend=backend)
    if settings.head is not None:
        from dinoforge.serve.heads import load_head  # torch: the full install, not the edge runtime

        res.head = load_head(settings.head)
        if res.head.card.model_sha256 != backend.info.weights_sha256:
            raise ArtifactError(f"head {settings.head} was built for model weights "
                                f"{res.head.card.model_sha256[:12]}…, but the served model is "
                                f"{backend.info.weights_sha256[:12]}…")
    if settings.index_dir is not None:
        from dinoforge.serve.index_store import IndexStore  # faiss: the full install, not the edge runtime

        pooling = backend.info.default_pooling
        res.index = IndexStore(settings.index_dir, dim=pooled_dim(backend.info.embed_dim, pooling),
                               pooling=pooling, model_sha256=backend.info.weights_sha256,
                               exact_limit=settings.index_exact_limit)
    return res


async def _warm_up(state: ServerState) -> None:
    assert state.backend is not None and state.engine is not None
    try:
        if state.settings.warmup:
            sizes = tuple(sorted({1, state.settings.max_batch_size}))
            t0 = time.perf_counter()
            await state.engine.run_in_inference_thread(state.backend.warmup, sizes)
            log.info("warm-up (batch sizes %s) took %.2f s", sizes, time.perf_counter() - t0)
        state.ready = True
    except Exception as err:  # a failed warm-up must show in /ready, not kill the server
        state.load_error = f"warm-up failed: {type(err).__name__}: {err}"
        log.error(state.load_error, exc_info=err)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.serve
    settings = state.settings
    state.started = time.monotonic()
    if not state.preloaded:
        try:
            res = await asyncio.to_thread(load_resources, settings, state.backend)
        except DinoforgeError as err:
            state.load_error = str(err)
            log.error("startup failed: %s", err)
            raise
        state.backend, state.head, state.index = res.backend, res.head, res.index
    backend = state.backend
    state.engine = BatchingEngine(backend, max_batch_size=settings.max_batch_size,
                                  max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
                                  max_queue_size=settings.max_queue_size,
                                  preprocess_workers=settings.preprocess_workers, max_pixels=settings.max_pixels,
                                  max_request_pixels=settings.max_request_pixels,
                                  large_image_pixels=settings.large_image_pixels,
                                  metrics=state.metrics)
    await state.engine.start()
    state.tasks.append(asyncio.create_task(_warm_up(state), name="dinoforge-warmup"))
    log.info("serving %s", backend.describe())
    try:
        yield
    finally:
        state.ready = False
        for task in state.tasks:
            task.cancel()
        await state.engine.stop()
        if state.index is not None:
            await asyncio.to_thread(state.index.close)
        if state.owns_backend:
            backend.close()


def create_app(settings: ServeSettings, *, backend: Backend | None = None,
               resources: Resources | None = None) -> FastAPI:
    """Build the server.

    Args:
        settings: limits, batching, security and model options.
        backend: an already loaded backend (the caller keeps ownership); the head and index are loaded at
            startup.
        resources: everything already loaded (:func:`load_resources`); the app owns and closes it.
            With neither, startup loads what the settings describe.

    Returns:
        A FastAPI app; run it with uvicorn (``dinoforge serve`` does).
    """
    app = FastAPI(title="dinoforge serve", version=__version__, lifespan=_lifespan,
                  description="Embeddings, classification and retrieval for DINOv2-style vision backbones.")
    metrics = ServeMetrics()
    state = ServerState(settings=settings, metrics=metrics, backend=backend, owns_backend=backend is None)
    if resources is not None:
        state.backend, state.head, state.index = resources.backend, resources.head, resources.index
        state.preloaded = True
    app.state.serve = state
    routers = [module.router for module in (health, embeddings, classify, retrieval, query, page)]
    for router in routers:
        app.include_router(router)
    app.mount(page.STATIC_PREFIX, page.static_files(), name="static")
    install_error_handlers(app)
    types = ({path: "application/json" for path in JSON_ROUTES}
             | {path: "multipart/form-data" for path in UPLOAD_ROUTES})
    # added innermost first: requests meet metrics -> auth -> guard -> allowed methods -> routes
    app.add_middleware(AllowMiddleware, routes=[r for router in routers for r in router.routes])
    app.add_middleware(GuardMiddleware, max_bytes=settings.max_payload_bytes, content_types=types,
                       body_timeout_s=settings.body_timeout_s, body_deadline_s=settings.request_timeout_s,
                       max_inflight_bytes=settings.max_inflight_body_bytes)
    app.add_middleware(AuthMiddleware, keys=settings.key_values(), open_paths=page.open_paths() | {"/health"})
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=[r for router in routers for r in router.routes])
    return app
