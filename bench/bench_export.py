"""Throughput and latency of one artifact per runtime: torch eager fp32, torch.compile, ORT fp32/fp16/int8.

    python bench/bench_export.py [--artifact DIR ...] [--batches 1,8,32] [--resolution 224] [--json OUT]
    python bench/bench_export.py --quick          # smoke test: tiny model, small batches, 2 iterations
    python bench/bench_export.py --device cuda    # GPU: torch eager fp32 vs torch.compile vs eager bf16

Without ``--artifact`` it benchmarks a random ViT-S/14 and a random ``test`` student (weights do not change
speed; pass the trained student artifact for the k-NN numbers to mean anything). ``--knn-images N`` adds the
int8 vs fp32 k-NN top-1 accuracy (N Fashion-MNIST train images as index, N test images as queries).
Quote medians measured in one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoforge.core.artifact import Artifact, Provenance, load_artifact, save_artifact
from dinoforge.core.backbone import build_backbone
from dinoforge.core.onnx_contract import CLS_OUTPUT, MEAN_OUTPUT
from dinoforge.core.pooling import pool
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.export.graph import ExportableViT
from dinoforge.export.onnx_export import export_module
from dinoforge.export.parity import knn_predict, run_session
from dinoforge.export.parity_data import default_image_dir, load_fmnist_knn, load_images, pixels_to_input, to_pixels
from dinoforge.export.parity_eval import session_for
from dinoforge.export.quantize import quantize_int8


def _time(fn: Callable[[], object], iters: int) -> list[float]:
    fn()  # warm-up (and compilation); a second call settles recompilation guards
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _random_artifacts(root: Path) -> list[Path]:
    out = []
    for arch, size in (("vits14", 224), ("test", 56)):
        torch.manual_seed(0)
        pre = PreprocessConfig(size=size, resize_size=round(size * 256 / 224))
        out.append(save_artifact(root / arch, build_backbone(arch), name=f"{arch}-random",
                                 provenance=Provenance(source="random-init"), preprocessing=pre))
    return out


def _runtimes(art: Artifact, hw: tuple[int, int], calib: np.ndarray, threads: int
              ) -> tuple[dict[str, Callable[[np.ndarray], object]], dict[str, Any]]:
    """The CPU runtimes to time, and the ONNX Runtime sessions behind them (reused by the int8 k-NN check)."""
    backbone = art.backbone
    compiled = torch.compile(backbone.forward_features, dynamic=False)  # one graph per batch size
    fp32, _ = export_module(ExportableViT(backbone, hw))
    fp16, _ = export_module(ExportableViT(backbone, hw, dtype=torch.float16))
    int8 = quantize_int8(fp32, calib)
    sessions = {"ort_fp32": session_for(fp32, threads), "ort_fp16": session_for(fp16, threads),
                "ort_int8": session_for(int8, threads)}

    def torch_fn(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], object]:
        return lambda x: fn(torch.from_numpy(x))

    runtimes: dict[str, Callable[[np.ndarray], object]] = {
        "torch_eager_fp32": torch_fn(backbone.forward_features), "torch_compiled_fp32": torch_fn(compiled)}
    for name, session in sessions.items():
        runtimes[name] = lambda x, s=session: s.run(None, {"pixel_values": x})
    return runtimes, sessions


def _gpu_runtimes(art: Artifact, device: str) -> dict[str, Callable[[np.ndarray], object]]:
    """torch eager fp32, torch.compile fp32 and eager bf16 (autocast) on an accelerator."""
    backbone = art.backbone.to(device)
    compiled = torch.compile(backbone.forward_features, dynamic=False)

    def run(fn: Callable[[torch.Tensor], torch.Tensor], bf16: bool = False) -> Callable[[np.ndarray], object]:
        def call(x: np.ndarray) -> object:
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                out = fn(torch.from_numpy(x).to(device, non_blocking=True))
            torch.cuda.synchronize() if torch.device(device).type == "cuda" else None
            return out
        return call

    return {"torch_eager_fp32": run(backbone.forward_features), "torch_compiled_fp32": run(compiled),
            "torch_eager_bf16": run(backbone.forward_features, bf16=True)}


def _knn_int8(art: Artifact, sessions: dict, hw: tuple[int, int], n: int) -> dict[str, float]:
    train, train_y, test, test_y = load_fmnist_knn(limit=n)
    pre = art.card.preprocessing
    x = pixels_to_input(to_pixels(train + test, pre, hw), pre).numpy()
    acc = {}
    for name in ("ort_fp32", "ort_int8"):
        out = run_session(sessions[name], x, 32)
        emb = pool(out[CLS_OUTPUT], out[MEAN_OUTPUT], art.card.default_pooling)
        pred = knn_predict(emb[:len(train)], train_y, emb[len(train):])
        acc[name] = float((pred == test_y).double().mean())
    return {"n": n, "fp32_accuracy": acc["ort_fp32"], "int8_accuracy": acc["ort_int8"],
            "int8_drop_pt": 100 * (acc["ort_fp32"] - acc["ort_int8"])}


def bench_artifact(path: Path, batches: list[int], resolution: int | None, iters: int, knn: int,
                   threads: int = 0, device: str = "cpu") -> dict:
    """All runtimes x batch sizes for one artifact."""
    art = load_artifact(path)
    size = resolution or art.card.preprocessing.size
    hw = (size, size)
    pre = art.card.preprocessing
    images = load_images(default_image_dir(), max(batches) + 32)
    x_all = pixels_to_input(to_pixels(images, pre, hw), pre).numpy()
    if device == "cpu":
        runtimes, sessions = _runtimes(art, hw, x_all[-32:], threads)
    else:
        runtimes, sessions, knn = _gpu_runtimes(art, device), {}, 0
    rows = []
    with torch.no_grad():
        for batch in batches:
            x = np.ascontiguousarray(x_all[:batch])
            for name, fn in runtimes.items():
                median = statistics.median(_time(lambda f=fn, x=x: f(x), iters))
                rows.append({"runtime": name, "batch": batch, "latency_ms": 1000 * median,
                             "images_per_s": batch / median})
                print(f"  {art.card.name:>16s} {name:20s} batch {batch:3d}: {1000 * median:9.2f} ms "
                      f"{batch / median:9.1f} img/s", flush=True)
    out = {"artifact": art.card.name, "resolution": size, "rows": rows}
    if knn:
        out["knn_int8"] = _knn_int8(art, sessions, hw, knn)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, action="append", default=[])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--resolution", type=int, help="default: each card's crop size")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--knn-images", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and onnxruntime intra-op threads (0: library defaults; --quick uses 1)")
    parser.add_argument("--device", default="cpu", help="cpu (all runtimes) or cuda (torch fp32/compiled/bf16)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 1,4, 2 iterations")
    args = parser.parse_args(argv)
    # On a shared machine OpenMP spin-waiting makes multi-threaded torch.compile code erratic: smoke tests use 1.
    threads = args.threads or (1 if args.quick else 0)
    if threads:
        torch.set_num_threads(threads)
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifact or _random_artifacts(Path(tmp))
        if args.quick and not args.artifact:
            artifacts = artifacts[1:]
        results = [bench_artifact(a, batches, args.resolution, 2 if args.quick else args.iters, args.knn_images,
                                  threads, args.device) for a in artifacts]
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "device": args.device, "results": results}
    if args.device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    for r in results:
        if args.device != "cpu":
            continue
        fp32 = {row["batch"]: row["images_per_s"] for row in r["rows"] if row["runtime"] == "ort_fp32"}
        int8 = {row["batch"]: row["images_per_s"] for row in r["rows"] if row["runtime"] == "ort_int8"}
        r["int8_speedup_vs_ort_fp32"] = {b: int8[b] / fp32[b] for b in fp32}
        print(f"{r['artifact']}: int8 / fp32 ORT throughput {r['int8_speedup_vs_ort_fp32']}"
              + (f"; k-NN {r['knn_int8']}" if "knn_int8" in r else ""))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
