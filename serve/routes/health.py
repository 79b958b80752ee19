"""``GET /health`` (liveness), ``GET /ready`` (model loaded and warmed up), ``GET /metrics``, ``GET /v1/models``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response

from dinoforge.serve.responses import ERROR_RESPONSES, json_response
from dinoforge.serve.state import ServerState, get_state

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers (no API key needed)")
async def health() -> Response:
    return json_response({"status": "ok"})


@router.get("/ready", responses=ERROR_RESPONSES, summary="Readiness: model loaded and warmed up (503 until then)")
async def ready(state: ServerState = Depends(get_state)) -> Response:
    if not state.ready or state.backend is None:
        status = "failed" if state.load_error else "loading"
        body = {"status": status, "reason": state.load_error or "model is loading or warming up"}
        return json_response(body, status=503, headers={"Retry-After": "1"})
    body = {"status": "ready", **state.backend.describe(), "max_batch_size": state.settings.max_batch_size,
            "head": state.head.describe() if state.head else None,
            "index": state.index.info() if state.index else None,
            "uptime_s": round(time.monotonic() - state.started, 3)}
    return json_response(body)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format 0.0.4"}})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/v1/models", summary="The served model (OpenAI-shaped list)")
async def models(state: ServerState = Depends(get_state)) -> Response:
    data = [{"id": state.model_name, "object": "model", "owned_by": "dinoforge"}] if state.model_name else []
    return json_response({"object": "list", "data": data})
