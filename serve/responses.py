"""Response helpers: fast JSON bodies, the timing block, readable validation errors, error handlers."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dinoforge.core.errors import DinoforgeError
from dinoforge.serve.engine import EngineResult
from dinoforge.serve.errors import ServeError, error_body
from dinoforge.serve.schemas import ErrorResponse

log = logging.getLogger("dinoforge.serve")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "malformed request (e.g. body is not JSON)", 401: "missing or invalid API key",
        404: "unknown model, id, or feature not configured", 408: "request body sent too slowly",
        413: "payload, image count, pixel or response size limit exceeded",
        415: "wrong Content-Type", 422: "invalid input (bad base64, not an image, bad option)",
        429: "queue full; retry after Retry-After seconds", 503: "model loading or warming up",
        504: "request deadline exceeded"}.items()
}


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise with the standard library (faster than validating big float lists through pydantic)."""
    return Response(content=json.dumps(body, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def timing(result: EngineResult, start: float) -> dict[str, float]:
    """The ``timing`` block of a response (milliseconds, rounded to microseconds)."""
    out = {k: round(v, 3) for k, v in result.timing.items()}
    out["total_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    """``("body", "input", 1)`` -> ``input[1]`` (the way the image errors of the engine name an input)."""
    parts = list(loc[1:] if loc[:1] == ("body",) and len(loc) > 1 else loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_message(err: ValidationError | RequestValidationError) -> str:
    """One line per problem, naming the field (``unknown field 'body.foo'``)."""
    lines = []
    for problem in err.errors():
        key = _loc(tuple(problem.get("loc", ())))
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown field {key!r}")
        elif problem["type"] == "missing" and key == "body":
            lines.append("request body is empty: send a JSON object")
        elif problem["type"] == "missing":
            lines.append(f"missing field {key!r}")
        elif problem["type"] in ("string_too_short", "too_short") and problem.get("ctx", {}).get("min_length") == 1:
            lines.append(f"{key}: empty")
        else:
            lines.append(f"{key}: {problem['msg']}")
    return "; ".join(lines)


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(error_body(status, message, kind), status=status, headers=headers)


async def _serve_error(_: Request, err: Exception) -> Response:
    assert isinstance(err, ServeError)
    return _error(err.status, err.message, err.kind, err.headers)


async def _dinoforge_error(_: Request, err: Exception) -> Response:
    return _error(422, str(err), "invalid_request_error")


async def _validation_error(_: Request, err: Exception) -> Response:
    assert isinstance(err, RequestValidationError)
    for problem in err.errors():
        if problem["type"] == "json_invalid":
            ctx = problem.get("ctx", {}).get("error", "")
            return _error(400, f"request body is not valid JSON: {ctx}".rstrip(": "), "invalid_request_error")
    return _error(422, validation_message(err), "invalid_request_error")


async def _http_error(_: Request, err: Exception) -> Response:
    assert isinstance(err, StarletteHTTPException)
    return _error(err.status_code, str(err.detail), "invalid_request_error", dict(err.headers or {}))


async def _unexpected(request: Request, err: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    return _error(500, "internal server error (details in the server log)", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{"error": {"message", "type", "code"}}``; no traceback ever reaches a client."""
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(DinoforgeError, _dinoforge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
