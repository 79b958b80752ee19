"""ASGI middlewares: request metrics, Bearer API keys, and the request guard (body size, content type).

They are plain ASGI (no ``BaseHTTPMiddleware``) so they add no task switches per request and can refuse a
request before its body is read: a wrong key or an oversized ``Content-Length`` costs the server nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from starlette.routing import BaseRoute, Match

from dinoforge.serve.errors import (MethodNotAllowed, Overloaded, PayloadTooLarge, RequestTimeout, ServeError,
                                   Unauthorized, UnsupportedMediaType, error_body)
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


class AllowMiddleware:
    """405 whose ``Allow`` names every method of the path (Starlette's names only the first matching route's,
    so ``OPTIONS /v1/index`` said ``POST`` although ``GET /v1/index`` exists)."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute]) -> None:
        self.app, self.routes = app, list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allowed: set[str] = set()
            for route in self.routes:
                match = route.matches(scope)[0]
                if match == Match.FULL:
                    break
                if match == Match.PARTIAL:
                    allowed |= set(getattr(route, "methods", None) or ())
            else:
                if allowed:
                    await send_error(send, MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']}",
                                                            allow=sorted(allowed)))
                    return
        await self.app(scope, receive, send)


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
    """Refuses oversized (413), slow (408) and too many concurrent (429) bodies and wrong content types (415)
    before any route sees the request; the limits apply while the body streams in, never after buffering it.

    Args:
        app: the wrapped app.
        max_bytes: body limit, checked on ``Content-Length`` and again while reading (chunked uploads).
        content_types: ``path -> expected media type prefix`` for routes with a body.
        body_timeout_s: longest pause between two body chunks (a trickling client gets 408).
        body_deadline_s: longest time to receive a whole body (408 after it).
        max_inflight_bytes: bytes of request bodies held by all requests at once; a body that would go over
            gets 429 with ``Retry-After``, so parallel large uploads cannot exhaust memory.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, content_types: dict[str, str], body_timeout_s: float = 10.0,
                 body_deadline_s: float = 60.0, max_inflight_bytes: int = 256 * 1024 * 1024) -> None:
        self.app, self.max_bytes, self.content_types = app, max_bytes, content_types
        self.body_timeout_s, self.body_deadline_s = body_timeout_s, body_deadline_s
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight = 0  # bytes reserved by bodies being read or held by running requests

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is {size} bytes or more; this server accepts at most "
                               f"{self.max_bytes} bytes")

    def _busy(self) -> Overloaded:
        return Overloaded(f"server is receiving {self.inflight} bytes of other requests (limit "
                          f"{self.max_inflight_bytes}); retry later", retry_after=1)

    def _check_headers(self, scope: Scope) -> int:
        """Validate the head; returns the declared body length (0 when unknown)."""
        length = _header(scope, b"content-length")
        declared = int(length) if length is not None and length.strip().isdigit() else 0
        if declared > self.max_bytes:
            raise self._too_large(declared)
        expected = self.content_types.get(scope["path"])
        if expected is not None and scope["method"] == "POST":
            given = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if given != expected:
                raise UnsupportedMediaType(f"Content-Type must be {expected} for {scope['path']}, "
                                           f"got {given or 'none'!r}")
        return declared

    def _reserve(self, n: int) -> None:
        if self.inflight + n > self.max_inflight_bytes:
            raise self._busy()
        self.inflight += n

    async def _read_body(self, receive: Receive, held: list[int]) -> bytes:
        """Read the whole body under the limits; ``held[0]`` tracks the bytes reserved for it."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_deadline_s  # a byte every few seconds must not last forever
        while True:
            wait = min(self.body_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                raise RequestTimeout(f"request body too slow: {size} bytes received, then nothing for "
                                     f"{self.body_timeout_s:g} s or past {self.body_deadline_s:g} s in all") from None
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(size)
            if size > held[0]:  # a chunked body, or more than declared: reserve as it grows
                self._reserve(size - held[0])
                held[0] = size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        held = [0]
        try:
            try:
                declared = self._check_headers(scope)
                self._reserve(declared)  # refused before a byte is read when the declared body does not fit
                held[0] = declared
                body = await self._read_body(receive, held)
            except ServeError as err:
                await send_error(send, err)
                return
            except ConnectionResetError:
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight -= held[0]  # the body is held until the request is answered


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then passes on (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
