"""Errors of the serving stack, each carrying the HTTP status it maps to.

They subclass :class:`~dinoforge.core.errors.DinoforgeError`, so the CLI (``dinoforge embed``) prints them
as one line, while the app's exception handlers turn them into ``{"error": {...}}`` JSON responses.
"""

from __future__ import annotations

from dinoforge.core.errors import DinoforgeError


class ServeError(DinoforgeError):
    """Base class: ``status`` is the HTTP code, ``headers`` extra response headers."""

    status: int = 400
    kind: str = "invalid_request_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServeError):
    """Syntactically broken request (e.g. a body that is not JSON)."""

    status = 400


class Unauthorized(ServeError):
    """Missing or wrong API key."""

    status = 401
    kind = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServeError):
    """Unknown model name, index id, or a feature this server was not started with."""

    status = 404
    kind = "not_found_error"


class MethodNotAllowed(ServeError):
    """The path exists, the method does not; ``Allow`` lists every method the path takes."""

    status = 405

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message, headers={"Allow": ", ".join(allow)})


class PayloadTooLarge(ServeError):
    """Too many bytes, too many images, or an image with too many pixels."""

    status = 413


class RequestTimeout(ServeError):
    """The client sent its request body too slowly (a pause longer than the body timeout)."""

    status = 408
    kind = "timeout_error"


class UnsupportedMediaType(ServeError):
    """The request's Content-Type does not fit the route."""

    status = 415


class InvalidInput(ServeError):
    """Well-formed request whose content cannot be processed (bad base64, not an image, bad option)."""

    status = 422


class Overloaded(ServeError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class NotReady(ServeError):
    """The model is still loading or warming up."""

    status = 503
    kind = "unavailable_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class DeadlineExceeded(ServeError):
    """The request's deadline passed before its images were processed."""

    status = 504
    kind = "timeout_error"


class BackendError(ServeError):
    """A remote backend (Triton) failed or answered something that does not fit the model contract."""

    status = 502
    kind = "backend_error"


class InferenceFailed(ServeError):
    """The local runtime raised while running a batch (a server-side fault, reported without a traceback)."""

    status = 500
    kind = "server_error"


def error_body(status: int, message: str, kind: str) -> dict[str, object]:
    """The JSON error envelope (OpenAI-shaped) used by every non-2xx response."""
    return {"error": {"message": message, "type": kind, "code": status}}
