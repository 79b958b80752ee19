"""Helpers of the serving tests: encoded images, an ONNX model with its index, and a `dinoforge serve` subprocess
on a free port."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from dinoforge.core.cli import main as cli_main
from dinoforge.serve.server import free_port


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    """An image file's bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def fmnist_images(fmnist_dir: Path, n: int, fmt: str = "JPEG") -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` Fashion-MNIST test images encoded as ``fmt``, and their labels."""
    from dinoforge.core.data import FashionMNISTSource

    src = FashionMNISTSource("test", root=fmnist_dir, download=False)
    files = [encode(Image.fromarray(src.images[i]), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
             for i in range(n)]
    return files, np.asarray(src.targets[:n])


def onnx_index_without_patch_tokens(artifact: Path, images: Path, out: Path) -> tuple[Path, Path]:
    """Export ``artifact`` to ONNX without ``--patch-tokens`` (``out/onnx``) and index ``images`` with that graph
    (``out/onnx_index``): a served model whose answers can carry no patch PCA."""
    export, index = out / "onnx", out / "onnx_index"
    assert cli_main(["export", "onnx", str(artifact), "--out", str(export), "--parity-limit", "4",
                     "--knn-limit", "0"]) == 0
    assert cli_main(["index", "build", "--model", str(export), "--input", str(images), "--index", str(index),
                     "--num-workers", "0", "--no-progress"]) == 0
    return export, index


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (a decompression bomb's header; the data is tiny)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


class ServeProcess:
    """``dinoforge serve ARGS`` in a subprocess on a free port; waits for ``/ready``."""

    def __init__(self, args: list[str], *, timeout_s: float = 90.0, env: dict[str, str] | None = None,
                 python: str | os.PathLike[str] = sys.executable) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # python: another environment's interpreter (the torch-free edge venv) serves the same way
        cmd = [str(python), "-m", "dinoforge.core.cli", "serve", *args, "--port", str(self.port),
               "--log-level", "warning"]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
        self._wait_ready(timeout_s, (env or {}).get("DINOFORGE_API_KEYS", "").split(",")[0])

    def _wait_ready(self, timeout_s: float, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dinoforge serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/ready", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout_s} s: {self.output()}")

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return (self.proc.stdout.read() if self.proc.stdout else b"").decode(errors="replace")[-4000:]

    def terminate(self) -> int:
        """Graceful stop (SIGTERM: uvicorn runs the lifespan shutdown)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        """Hard stop (SIGKILL: no shutdown code runs)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()
