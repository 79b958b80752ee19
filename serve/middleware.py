"""ASGI middlewares: request metrics, Bearer API keys, and the request guard (body size, content type).

They are plain ASGI (no ``BaseHTTPMiddleware``) so they add no task switches per request and can refuse a
request before its body is read: a wrong key or an oversized ``Content-Length`` costs the server nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from starlette.routing import BaseRoute, Match

from dinoforge.serve.errors import PayloadTooLarge, ServeError, Unauthorized, UnsupportedMediaType, error_body
from dinoforge.serve.metrics import ServeMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, err: ServeError) -> None:
    """Write a JSON error response straight to the ASGI ``send``."""
    body = json.dumps(error_body(err.status, err.message, err.kind), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class MetricsMiddleware:
    """Counts every response by route template, method and status; times it."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics, routes: Iterable[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, list(routes)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        for candidate in self.routes:  # refused before routing (401, 413): find the template ourselves
            if candidate.matches(scope)[0] != Match.NONE and hasattr(candidate, "path"):
                return candidate.path
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(self._route(scope), scope["method"], status, time.perf_counter() - start)


class AuthMiddleware:
    """Requires ``Authorization: Bearer KEY`` with one of ``keys`` on every path except ``open_paths``."""

    def __init__(self, app: ASGIApp, *, keys: list[str], open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        # only digests are kept: equal-length values for compare_digest, and no key in clear text in memory dumps
        self.app, self.keys, self.open_paths = app, [_digest(k.encode()) for k in keys], open_paths

    def _allowed(self, header: str | None) -> bool:
        if not header or not header[:7].lower() == "bearer ":
            return False
        # headers arrive as bytes and are decoded latin-1: encoding back gives the client's bytes (UTF-8 keys work)
        given = _digest(header[7:].strip().encode("latin-1"))
        # constant time: every key is compared (no early exit), on fixed-length digests (no length leak)
        return sum(hmac.compare_digest(given, key) for key in self.keys) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        if not self._allowed(header):
            reason = "missing API key: send 'Authorization: Bearer KEY'" if not header else "invalid API key"
            await send_error(send, Unauthorized(reason))
            return
        await self.app(scope, receive, send)


class GuardMiddleware:
    """Refuses oversized bodies (413) and wrong content types (415) before any route sees the request.

    Args:
        app: the wrapped app.
        max_bytes: body limit, checked on ``Content-Length`` and again while reading (chunked uploads).
        content_types: ``path -> expected media type prefix`` for routes with a body.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, content_types: dict[str, str]) -> None:
        self.app, self.max_bytes, self.content_types = app, max_bytes, content_types

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is {size} bytes or more; this server accepts at most "
                               f"{self.max_bytes} bytes")

    def _check_headers(self, scope: Scope) -> None:
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise self._too_large(int(length))
        expected = self.content_types.get(scope["path"])
        if expected is not None and scope["method"] == "POST":
            given = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if given != expected:
                raise UnsupportedMediaType(f"Content-Type must be {expected} for {scope['path']}, "
                                           f"got {given or 'none'!r}")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(scope)
            body = await self._read_body(receive)
        except ServeError as err:
            await send_error(send, err)
            return
        except ConnectionResetError:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # only a disconnect can follow
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
