"""Helpers shared by the tests of several stages: the CLI as a real process (alone or under torchrun), a process
killed at a chosen moment, and bit-exact comparison of nested training states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

#: One OpenMP/MKL thread per process: test processes share a 2-core machine, extra threads only wait.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli_command(*args: str, nproc: int = 1) -> list[str]:
    """``python -m dinoforge.core.cli ARGS``, under ``torchrun --standalone`` with ``nproc`` processes if > 1."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "dinoforge.core.cli", *args]


def process_env(**extra: str) -> dict[str, str]:
    """This process's environment with :data:`ONE_THREAD` and ``extra`` on top."""
    return {**os.environ, **ONE_THREAD, **extra}


def run_cli(*args: str, nproc: int = 1, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``dinoforge ARGS`` to the end (see :func:`cli_command`); output captured as text, never raises."""
    return subprocess.run(cli_command(*args, nproc=nproc), env=process_env(**env), capture_output=True, text=True,
                          timeout=timeout, check=False)


def kill_when(cmd: list[str], ready: Callable[[], bool], *, env: dict[str, str], timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` holds, i.e. mid-run (it must not finish first)."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty process never blocks on a full pipe
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if proc.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(f"exited before it could be killed: {stderr.read().decode()[-2000:]}")
                assert time.monotonic() < deadline, "the moment to kill never came"
                time.sleep(0.02)
        finally:
            if proc.poll() is None:  # the moment came, or the test failed: nothing is left running either way
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def assert_same(a: object, b: object, what: str) -> None:
    """Recursive equality of nested dicts / lists / tensors, tensors compared bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for key in a:
            assert_same(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs"
    else:
        assert a == b, f"{what}: {a} != {b}"


def checkpoint_exists(run_dir: Path, step: int) -> Callable[[], bool]:
    """A :func:`kill_when` condition: the training checkpoint of ``step`` is on disk."""
    from dinoforge.pretrain.checkpointing import checkpoint_path

    return lambda: checkpoint_path(run_dir / "checkpoints", step).exists()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Base URL of a plain HTTP server on the loopback serving ``root`` (it answers no range requests)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
