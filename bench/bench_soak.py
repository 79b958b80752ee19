"""Soak test of `dinoforge serve`: hostile and honest traffic together, for a bounded time, on 127.0.0.1 only.

``--concurrency`` closed-loop clients (32 by default) each pick a request at random (fixed seed):

* ``good`` (70 %): 1-4 real photos (JPEG, base64 JSON) -> 200 expected (429 counts as shed load);
* ``bad`` (15 %): truncated JPEG, text, broken base64, a URL, an empty list, ``"normalize": "yes"``, a 1 x 20000
  PNG (thin image) -> 4xx expected;
* ``oversize`` (15 %): more images than allowed, a body over the payload limit, a decompression-bomb header,
  patch tokens beyond the response limit -> 413 expected.

It reports server errors (5xx other than a 503 of the connection cap, and dropped connections), latency
percentiles of the good requests, status counts per kind, and the server's RSS: after ``--warmup`` seconds,
at the end, and the growth between them (median of the first and last 10 % of the samples after warm-up).

Usage: python bench/bench_soak.py [--seconds 600] [--warmup 60] [--concurrency 32] [--model ARTIFACT]
       [--out soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # never anything else: the soak is an attack on a local server
MAX_IMAGES, MAX_PAYLOAD = 16, 2_000_000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0, help="load duration, warm-up included")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", type=Path, help="artifact (default: a random 'test' backbone at 56 px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    args = p.parse_args()
    if not 0 <= args.warmup < args.seconds:
        p.error("--warmup must be shorter than --seconds")
    return args


# ---------------------------------------------------------------------------------------------- inputs
def make_model(tmp: Path) -> Path:
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    return save_artifact(tmp / "test", build_backbone("test"), name="test-random",
                         preprocessing=PreprocessConfig(size=56, resize_size=64, patch_size=14),
                         provenance=Provenance(source="random-init"))


def photos() -> list[bytes]:
    """Real photos as JPEG (scikit-image's bundled pictures)."""
    import skimage.data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "camera", "cat"):
        if hasattr(skimage.data, name):
            buf = io.BytesIO()
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 40, 10)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_header() -> bytes:
    """A PNG whose header claims 60000 x 60000 pixels (the data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@dataclass
class Requests:
    """Ready-made request bodies of each kind (built once, picked at random)."""

    good: list[str]
    bad: list[dict[str, Any]] = field(default_factory=list)
    oversize: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, pool: list[bytes]) -> Requests:
        good = [_b64(p) for p in pool]
        jpeg = pool[0]
        bad = [{"input": [_b64(jpeg[: len(jpeg) // 3])]}, {"input": [_b64(b"plain text, no image " * 40)]},
               {"input": ["%%%not-base64%%%"]}, {"input": ["https://example.com/cat.jpg"]}, {"input": []},
               {"input": [good[0]], "normalize": "yes"}, {"input": [_b64(_png(1, 20000))]}]
        oversize = [{"input": [good[0]] * (MAX_IMAGES + 1)}, {"input": ["A" * MAX_PAYLOAD]},
                    {"input": [_b64(_bomb_header())]},
                    {"input": [good[i % len(good)] for i in range(MAX_IMAGES)], "return_patch_tokens": True}]
        return cls(good, bad, oversize)

    def pick(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        roll = rng.random()
        if roll < 0.70:
            return "good", {"input": rng.sample(self.good, k=rng.randint(1, min(4, len(self.good))))}
        if roll < 0.85:
            return "bad", rng.choice(self.bad)
        return "oversize", rng.choice(self.oversize)


# ---------------------------------------------------------------------------------------------- server
def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    from dinoforge.serve.server import free_port

    port = free_port(HOST)
    cmd = [sys.executable, "-m", "dinoforge.core.cli", "serve", "--model", str(model), "--host", HOST, "--port",
           str(port), "--log-level", "error", "--max-images", str(MAX_IMAGES), "--max-payload-mb",
           str(MAX_PAYLOAD / 2**20), "--max-queue-size", "256", "--max-response-mb", "0.25"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dinoforge serve did not become ready (exit {proc.poll()})")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------------------------------------- load
@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count
    good_latency: list[float] = field(default_factory=list)
    dropped: int = 0
    server_errors: list[str] = field(default_factory=list)


async def _worker(client: httpx.AsyncClient, reqs: Requests, rng: random.Random, stop: float, tally: Tally) -> None:
    while time.monotonic() < stop:
        kind, body = reqs.pick(rng)
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/embeddings", json=body)
        except httpx.TransportError as err:
            tally.dropped += 1
            tally.server_errors.append(f"{kind}: {type(err).__name__}")
            continue
        tally.statuses[(kind, r.status_code)] += 1
        if r.status_code >= 500 and r.status_code != 503:
            tally.server_errors.append(f"{kind}: {r.status_code} {r.text[:200]}")
        if kind == "good" and r.status_code == 200:
            tally.good_latency.append(time.perf_counter() - t0)


async def _sample_rss(pid: int, stop: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < stop:
        samples.append((time.monotonic() - start, rss_mb(pid)))
        await asyncio.sleep(1.0)


async def soak(url: str, pid: int, reqs: Requests, args: argparse.Namespace) -> tuple[Tally, list]:
    tally, samples = Tally(), []
    stop = time.monotonic() + args.seconds
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        await asyncio.gather(_sample_rss(pid, stop, samples),
                             *(_worker(client, reqs, rng, stop, tally) for rng in rngs))
    return tally, samples


def report(tally: Tally, samples: list[tuple[float, float]], args: argparse.Namespace) -> dict[str, Any]:
    after = [mb for t, mb in samples if t >= args.warmup]
    tenth = max(1, len(after) // 10)
    start_mb, end_mb = statistics.median(after[:tenth]), statistics.median(after[-tenth:])
    ms = np.asarray(tally.good_latency) * 1e3
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(tally.statuses.items()):
        by_kind.setdefault(kind, {})[str(status)] = n
    return {
        "seconds": args.seconds, "warmup_s": args.warmup, "concurrency": args.concurrency,
        "requests": sum(tally.statuses.values()), "statuses": by_kind,
        "server_errors": len(tally.server_errors), "server_error_examples": tally.server_errors[:5],
        "good_ok": len(ms), "good_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "good_p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "rss_mb": {"idle": samples[0][1] if samples else None, "after_warmup": start_mb, "end": end_mb,
                   "max": max(mb for _, mb in samples), "growth_pct": 100 * (end_mb - start_mb) / start_mb},
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()),
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp))
        reqs = Requests.build(photos())
        proc, url = start_server(model)
        try:
            tally, samples = asyncio.run(soak(url, proc.pid, reqs, args))
            alive = proc.poll() is None and httpx.get(url + "/health", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {**report(tally, samples, args), "server_alive_after": alive}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["server_errors"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
