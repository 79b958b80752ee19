"""The edge runtime's acceptance figures: venv size, cold start, idle RSS, throughput vs the full install.

    python bench/bench_edge.py --model runs/demo/onnx [--threads 2] [--concurrency 8] [--seconds 20]
                               [--rounds 3] [--venv DIR] [--json OUT]

* builds (or reuses, ``--venv DIR`` holding ``venv/``) a fresh ``pip install "dinoforge[edge]"`` environment
  from this tree (``bench/edge_env.py``) and reports its size and that ``import torch`` fails there;
* cold start: wall time from spawning ``dinoforge serve --model MODEL`` to the first ``/ready`` 200, then the
  server's resident memory after 3 s idle — for the edge venv and for this (torch-installed) environment,
  ``--rounds`` times each, alternating;
* throughput: closed-loop ``/v1/embeddings`` requests of one real JPEG each (``--concurrency`` in flight,
  ``--seconds`` per window, ``bench_serve.bench_serve``) against the edge server and the full server on the same
  ONNX graph, in ``--rounds`` adjacent pairs; the ratio edge / full per pair and its median.

int8 vs fp32 (ViT-S/14 and the student, batch 8, 2 threads) is ``bench/bench_int8.py``.
Run it on a quiet machine: every figure here is a wall-clock time or a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_serve import bench_serve, jpeg_pool
from edge_env import TRAINING_MODULES, build_edge_venv, dir_bytes, importable

from dinoforge.serve.server import free_port

TARGETS = {"venv_mb": 350, "idle_rss_mb": 250, "cold_start_s": 2.0, "throughput_ratio": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="ONNX export folder or .onnx file (the demo student)")
    p.add_argument("--venv", type=Path, help="folder whose venv/ is reused, or where it is built (default: temp)")
    p.add_argument("--threads", type=int, default=2, help="runtime intra-op threads of both servers (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--seconds", type=float, default=20.0, help="throughput window per server (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="cold starts per install / throughput pairs (default 3)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `dinoforge serve` argument for both servers, e.g. --serve-arg=--max-batch-size=8")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def edge_python(args: argparse.Namespace) -> Path:
    """The edge venv's python: reused from ``--venv`` when it exists there, else built."""
    root = args.venv or Path(tempfile.mkdtemp(prefix="dinoforge-edge-"))
    python = root / "venv" / "bin" / "python"
    if not python.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"building the edge venv in {root} (pip install \"dinoforge[edge]\") ...", flush=True)
        python = build_edge_venv(root)
    return python


def rss_mb(pid: int) -> float:
    """Resident memory of a process (``VmRSS``), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(python: Path, model: Path, threads: int, extra: list[str] | None = None,
                 timeout_s: float = 300) -> tuple[subprocess.Popen, str, float]:
    """Spawn ``dinoforge serve`` with ``python``; return the process, its URL and the seconds to ``/ready``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "dinoforge.core.cli", "serve", "--model", str(model), "--port", str(port),
           "--threads", str(threads), "--log-level", "warning", *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    with httpx.Client(timeout=2) as client:
        while time.perf_counter() - start < timeout_s:
            try:
                if client.get(url + "/ready").status_code == 200:
                    return proc, url, time.perf_counter() - start
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def cold_starts(pythons: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per install: every cold start (s) and the idle RSS (MB) after it, alternating installs."""
    out: dict[str, dict[str, Any]] = {name: {"cold_start_s": [], "idle_rss_mb": []} for name in pythons}
    for _ in range(args.rounds):
        for name, python in pythons.items():
            proc, _, seconds = start_server(python, args.model, args.threads, args.serve_arg)
            time.sleep(3.0)  # idle: warm-up done, no request
            out[name]["cold_start_s"].append(round(seconds, 3))
            out[name]["idle_rss_mb"].append(round(rss_mb(proc.pid), 1))
            stop(proc)
    for row in out.values():
        row["cold_start_median_s"] = statistics.median(row["cold_start_s"])
        row["idle_rss_median_mb"] = statistics.median(row["idle_rss_mb"])
    return out


def throughput_pairs(pythons: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` adjacent (edge, full) windows on the same graph; ratio edge / full per pair."""
    jpegs = jpeg_pool()
    pairs = []
    for _ in range(args.rounds):
        pair = {}
        for name, python in pythons.items():
            proc, url, _ = start_server(python, args.model, args.threads, args.serve_arg)
            try:
                pair[name] = bench_serve(url, jpegs, args.concurrency, args.seconds)
            finally:
                stop(proc)
        pair["ratio"] = pair["edge"]["img_per_s"] / pair["full"]["img_per_s"]
        pairs.append(pair)
    return {"pairs": pairs, "ratio_median": statistics.median(p["ratio"] for p in pairs)}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def report(res: dict[str, Any]) -> str:
    """The acceptance table (measured vs target)."""
    starts, tp = res["cold_start"], res["throughput"]
    rows = [("edge venv size", f"{res['venv_mb']:.1f} MB", f"<= {TARGETS['venv_mb']} MB"),
            ("import torch in the edge venv", "fails" if not res["torch_importable"] else "SUCCEEDS", "fails"),
            ("edge idle RSS (median)", f"{starts['edge']['idle_rss_median_mb']:.0f} MB "
                                       f"(full install: {starts['full']['idle_rss_median_mb']:.0f} MB)",
             f"<= {TARGETS['idle_rss_mb']} MB"),
            ("edge cold start to /ready (median)", f"{starts['edge']['cold_start_median_s']:.2f} s "
                                                   f"(full install: {starts['full']['cold_start_median_s']:.2f} s)",
             f"<= {TARGETS['cold_start_s']} s"),
            ("throughput edge / full (median of pairs)", f"{tp['ratio_median']:.3f} ("
             + ", ".join(f"{p['edge']['img_per_s']:.1f}/{p['full']['img_per_s']:.1f}" for p in tp["pairs"])
             + " img/s)", ">= 1.0")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}  [target {c}]" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = edge_python(args)
    pythons = {"edge": python, "full": Path(sys.executable)}
    res: dict[str, Any] = {"machine": machine(), "model": str(args.model), "threads": args.threads,
                           "serve_args": args.serve_arg,
                           "concurrency": args.concurrency, "seconds": args.seconds,
                           "venv_mb": dir_bytes(python.parents[1]) / 1e6,
                           "torch_importable": any(importable(python, m) for m in TRAINING_MODULES)}
    res["cold_start"] = cold_starts(pythons, args)
    res["throughput"] = throughput_pairs(pythons, args)
    print(json.dumps(res["machine"]))
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
