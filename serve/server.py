"""Running the app with uvicorn: in the foreground (CLI) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dinoforge.core.errors import ConfigError
from dinoforge.serve.app import Resources, create_app
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.errors import error_body
from dinoforge.serve.settings import ServeSettings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_BUSY_BODY = json.dumps(error_body(503, "too many open connections; retry later", "unavailable_error")).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


def guarded_protocol(max_connections: int, head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus the two guards it lacks against slow or numerous clients.

    * a connection cap: connections beyond ``max_connections`` get a 503 and are closed at once (uvicorn's
      ``limit_concurrency`` only answers once a whole request head has arrived, and keeps the socket);
    * a deadline for request heads: a connection that has not sent a complete head ``head_timeout_s`` after
      it opened or finished its last response is closed (uvicorn's keep-alive timer restarts on every byte,
      so a client trickling one header line at a time would hold the connection forever).
    """

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        # asyncio.Protocol takes any BaseTransport; uvicorn's H11Protocol narrows it to Transport (under the
        # same ignore), and this override keeps uvicorn's signature since it writes to and closes the socket.
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_BUSY)
                transport.close()
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_head_timer()  # between requests, or a head still incomplete
            elif self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(settings: ServeSettings, backend: Backend | None = None, *, resources: Resources | None = None,
                   **overrides: Any) -> uvicorn.Config:
    """uvicorn settings for the app: one process (the engine batches across requests), no access log, the
    connection cap and head deadline of :func:`guarded_protocol`."""
    app = create_app(settings, backend=backend, resources=resources)
    kwargs: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "warning",
                              "access_log": False, "lifespan": "on", "timeout_graceful_shutdown": 10,
                              "http": guarded_protocol(settings.max_connections, settings.header_timeout_s),
                              "limit_concurrency": settings.max_connections,
                              "timeout_keep_alive": min(5.0, settings.header_timeout_s)}
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)


def check_port(host: str, port: int) -> None:
    """Fail with a clear message when ``host:port`` cannot be bound (in use, bad address, privileged)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_forever(settings: ServeSettings, resources: Resources, log_level: str = "info") -> None:
    """Run until interrupted (``dinoforge serve``); the app owns ``resources`` and closes them at exit."""
    server = uvicorn.Server(uvicorn_config(settings, resources=resources, log_level=log_level))
    server.run()
    if not server.started:
        raise ConfigError(f"the server did not start on {settings.host}:{settings.port} (see the log above)")


class BackgroundServer:
    """A real uvicorn server on a free local port, on a daemon thread.

    Example::

        with BackgroundServer(settings, backend=FakeBackend()) as server:
            httpx.get(server.url + "/health")

    Args:
        settings: server settings (``port=0`` picks a free port).
        backend: optional preloaded backend.
        ready_timeout_s: how long :meth:`start` waits for ``/ready``-level readiness.
    """

    def __init__(self, settings: ServeSettings, *, backend: Backend | None = None,
                 ready_timeout_s: float = 60.0) -> None:
        if settings.port == 0:
            settings = settings.model_copy(update={"port": free_port(settings.host)})
        self.settings = settings
        self.config = uvicorn_config(settings, backend)
        self.server = uvicorn.Server(self.config)
        self.ready_timeout_s = ready_timeout_s
        self.exit_code: int | str | None = None
        self._thread = threading.Thread(target=self._run, name="dinoforge-uvicorn", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits the process on a failed startup; here only the thread ends
            self.exit_code = exc.code

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def app(self) -> Any:
        return self.config.app

    @property
    def state(self) -> Any:
        """The app's :class:`~dinoforge.serve.state.ServerState`."""
        return self.config.app.state.serve

    def start(self, *, wait_ready: bool = True) -> BackgroundServer:
        """Start; wait until the socket listens and (``wait_ready``) the model is warmed up."""
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError(self.state.load_error or "uvicorn exited during startup (see the log above)")
            if self.server.started and (self.state.ready or not wait_ready):
                return self
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout_s} s")

    def stop(self) -> None:
        """Graceful shutdown (lifespan exit: engine stopped, index flushed)."""
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
