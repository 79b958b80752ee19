"""The attacks of the hardening issue, replayed against a local `dinoforge serve` (127.0.0.1 only).

Each attack reports the status the attacker got, the time it took, the server's RSS growth and, where it
matters, what an honest client saw meanwhile:

* ``thin``: 1 x 100000 and 1 x 2000 PNGs (a few hundred bytes each);
* ``decode``: eight all-black 7999 x 7999 PNGs in one request, then three (within the request pixel budget),
  with the latency of a 1-image request sent while they decode;
* ``response``: 128 tiny images with ``return_patch_tokens`` on a ViT-S/14 (224 px);
* ``slow``: 200 connections trickling header bytes (how many are still open after 15 s), and eight parallel
  60 MB bodies (RSS growth);
* ``leak``: the message of a non-image input (does it show an object address?).

Run it from a checkout to measure that checkout; to measure an older commit, put a checkout of it first on
PYTHONPATH (see docs/serve.md#hardening). Usage: python bench/bench_hostile.py [--only thin,decode,...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

HOST = "127.0.0.1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))


def make_model(tmp: Path, arch: str, size: int) -> Path:
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    pre = PreprocessConfig(size=size, resize_size=size * 8 // 7, patch_size=14)
    return save_artifact(tmp / arch, build_backbone(arch), name=f"{arch}-random", preprocessing=pre,
                         provenance=Provenance(source="random-init"))


class Server:
    """`dinoforge serve` in a subprocess of whatever `dinoforge` this interpreter imports."""

    def __init__(self, model: Path, *extra: str) -> None:
        from dinoforge.serve.server import free_port

        self.port = free_port(HOST)
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "dinoforge.core.cli", "serve", "--model", str(model), "--host", HOST,
               "--port", str(self.port), "--log-level", "error", *extra]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def rss(self) -> float:
        return _rss_mb(self.proc.pid)

    def peak_growth(self, fn: Any) -> tuple[Any, int]:
        """``fn()``'s result and the server's peak RSS growth (MB, sampled every 50 ms) while it ran."""
        before, peak, done = self.rss(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], self.rss())
                except (OSError, StopIteration):
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            done.set()
            thread.join()
        return result, round(max(peak[0], self.rss()) - before)

    def post(self, body: dict[str, Any], timeout: float = 600) -> tuple[int, float, int]:
        """Status, seconds and response bytes of one ``/v1/embeddings`` request."""
        t0 = time.perf_counter()
        try:
            r = httpx.post(self.url + "/v1/embeddings", json=body, timeout=timeout)
        except httpx.TransportError as err:
            return -1, time.perf_counter() - t0, len(str(err))
        return r.status_code, round(time.perf_counter() - t0, 2), len(r.content)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def attack_thin(model: Path) -> dict[str, Any]:
    out = {}
    for width, height in ((1, 100_000), (1, 2000)):
        server = Server(model)
        body = {"input": [_b64(_png(width, height))]}
        (status, seconds, _), growth = server.peak_growth(lambda s=server, b=body: s.post(b))
        out[f"{width}x{height}"] = {"status": status, "s": seconds, "peak_rss_growth_mb": growth}
        server.close()
    return out


def _while_busy(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    small = {"input": [_b64(_png(40, 30))]}
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(zip(("status", "s", "bytes"), server.post(body), strict=True)))

    def attack() -> None:
        thread.start()
        time.sleep(0.5)
        result["small_request_s"] = server.post(small)[1]
        thread.join()

    result["peak_rss_growth_mb"] = server.peak_growth(attack)[1]
    return result


def attack_decode(model: Path) -> dict[str, Any]:
    black = _b64(_png(7999, 7999))
    server = Server(model)
    out = {"eight": _while_busy(server, {"input": [black] * 8}),
           "three": _while_busy(server, {"input": [black] * 3})}
    server.close()
    return out


def attack_response(vits: Path) -> dict[str, Any]:
    server = Server(vits)
    tiny = [_b64(_png(8, 8)) for _ in range(128)]
    (status, seconds, size), growth = server.peak_growth(lambda: server.post({"input": tiny,
                                                                              "return_patch_tokens": True}))
    out = {"json": {"status": status, "s": seconds, "bytes": size, "peak_rss_growth_mb": growth}}
    status, seconds, size = server.post({"input": tiny, "return_patch_tokens": True, "encoding_format": "base64",
                                         "patch_tokens_dtype": "float16"})
    out["float16"] = {"status": status, "s": seconds, "bytes": size}
    server.close()
    return out


async def _big_bodies(url: str, n: int, size: int) -> list[int]:
    body = b'{"input": ["' + b"A" * size + b'"]}'
    async with httpx.AsyncClient(timeout=300) as client:
        answers = await asyncio.gather(*(client.post(url + "/v1/embeddings", content=body,
                                                     headers={"content-type": "application/json"})
                                         for _ in range(n)), return_exceptions=True)
    return [getattr(a, "status_code", -1) for a in answers]


def attack_slow(model: Path) -> dict[str, Any]:
    server = Server(model)
    socks = []
    for _ in range(200):
        sock = socket.create_connection((HOST, server.port))
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    stop = time.monotonic() + 15
    while time.monotonic() < stop:  # one header line per connection every second
        for sock in socks:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        time.sleep(1)
    still_open = sum(1 for s in socks if _open(s))
    for sock in socks:
        sock.close()
    statuses, growth = server.peak_growth(lambda: asyncio.run(_big_bodies(server.url, 8, 60 * 2**20)))
    out = {"trickling_connections_open_after_15s": still_open, "bodies_8x60MB": statuses,
           "bodies_peak_rss_growth_mb": growth}
    server.close()
    return out


def _open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def attack_leak(model: Path) -> dict[str, Any]:
    server = Server(model)
    r = httpx.post(server.url + "/v1/embeddings", json={"input": [_b64(b"no image here" * 10)]}, timeout=60)
    server.close()
    message = r.json()["error"]["message"]
    return {"status": r.status_code, "message": message, "shows_address": "0x" in message}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="thin,decode,response,slow,leak")
    args = p.parse_args()
    import dinoforge.serve

    report: dict[str, Any] = {"code": str(Path(dinoforge.serve.__file__).parent.parent),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_model(Path(tmp), "test", 56)
        attacks = {"thin": lambda: attack_thin(tiny), "decode": lambda: attack_decode(tiny),
                   "response": lambda: attack_response(make_model(Path(tmp), "vits14", 224)),
                   "slow": lambda: attack_slow(tiny), "leak": lambda: attack_leak(tiny)}
        for name in args.only.split(","):
            report[name] = attacks[name]()
            print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
