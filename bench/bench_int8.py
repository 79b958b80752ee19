"""int8 variants against fp32 on ONNX Runtime's CPU provider: throughput at one batch size, k-NN drop.

    python bench/bench_int8.py [--artifact DIR ...] [--batch 8] [--threads 2] [--iters 20] [--rounds 5]
                               [--knn-images 1000]
    python bench/bench_int8.py --quick      # smoke test: the tiny test model, 2 iterations, 40 k-NN images

Without ``--artifact`` it runs a random ViT-S/14 at 224 px (speed only: its k-NN numbers mean nothing) and the
demo's distilled student (``runs/demo/distill/artifacts/vit192``, written by ``make demo``) when it exists.
Random weights get small non-zero biases: a fresh init's zero biases are dropped by the graph simplifier, which
would hide the bias ``Add`` nodes every trained model has and the fusions need. For each model the fp32 graph of
``dinoforge export onnx`` is quantized several ways (``export/quantize.py``):

* ``fp32 +SkipLN`` — the fp32 graph in a session with ONNX Runtime's ``SkipLayerNormFusion`` on (its default;
  dinoforge's sessions turn it off, ``core/ort_session.py``); ``fused fp32`` — ONNX Runtime's transformer
  fusions alone: one ``Attention`` per block, bias + GELU;
* ``qdq`` — the export default (``--int8-scheme cpu``): static QDQ, uint8 activations, per-channel int8
  weights, weight matmuls;
* ``dynamic`` (``--int8-scheme dynamic``) — the fusions, then dynamic int8 (no calibration) of every weight
  matmul and fused ``Attention`` (``QAttention``); ``dynamic, unfused`` without the fusions;
  ``dynamic +SkipLN`` with ``SkipLayerNormalization`` fused too, as ONNX Runtime's fusion pass does by default;
* for a model with a convolutional stem: ``mixed`` (``--int8-scheme mixed``) — ``dynamic`` plus the stem
  static int8 end to end (convolutions, ReLU6, residual adds) from the first block that keeps the embeddings
  (the image's convolution float); ``mixed, whole stem`` — every stem block int8, whatever the embeddings
  lose (what the float first blocks cost in speed; the parity gate may refuse it); ``qdq+convs`` — ``qdq`` plus
  the whole stem.

Each graph runs in its own session (``--threads`` intra-op threads) on ``--batch`` real images, timed in
``--rounds`` interleaved rounds of ``--iters`` runs: the median over rounds of each round's median gives img/s
and the speed-up over fp32 (this VM's speed drifts; interleaving spreads the drift over every graph); min cosine of the CLS embedding against fp32 on
the same images; DINOv2 k-NN top-1 on Fashion-MNIST (``--knn-images`` train as index, as many test as queries)
and the drop against fp32 in points. Targets (issue "Edge runtime"): int8 >= 2.0x fp32 at batch 8 with
2 threads, drop <= 0.5 pt. Run it on a quiet machine.

``--resolution R`` exports at R px instead of the card's size (the position embeddings are interpolated, as
the exporter does for any size). ``--profile`` adds, per graph, ONNX Runtime's profile of ``--iters`` runs in a
session of its own: milliseconds per run by operator type (where the time goes; printed and in ``--json``).
``--instances N`` also times each graph as N concurrent sessions of ``--threads / N`` intra-op threads, each
running the batch (ONNX Runtime's int8 graphs gain less than fp32 ones from a second intra-op thread; a
second session on the other core recovers part of it), in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import ValidationError
from bench_export import _random_artifacts, _time

from dinoforge.core.artifact import Artifact, load_artifact
from dinoforge.core.image_contract import PreprocessConfig
from dinoforge.core.onnx_contract import CLS_OUTPUT, MEAN_OUTPUT
from dinoforge.core.ort_session import create_session
from dinoforge.core.pooling import pool
from dinoforge.export.graph import ExportableViT
from dinoforge.export.onnx_export import export_module
from dinoforge.export.parity import knn_predict, run_session
from dinoforge.export.parity_data import default_image_dir, load_fmnist_knn, load_images, pixels_to_input, to_pixels
from dinoforge.export.quantize import (conv_stem_nodes, fuse_transformer, quantize_dynamic_int8, quantize_int8,
                                       quantize_mixed_int8)

DEMO_STUDENT = Path(__file__).resolve().parents[1] / "runs/demo/distill/artifacts/vit192"  # `make demo` step 3


Graphs = dict[str, tuple[onnx.ModelProto, bool]]


def variants(fp32: onnx.ModelProto, calib: np.ndarray, art: Artifact) -> tuple[Graphs, dict[str, int]]:
    """Every graph to compare (fp32 first) with its session's SkipLayerNormFusion flag, and the fusion counts."""
    arch = art.card.architecture
    fused, stats = fuse_transformer(fp32, arch.num_heads, arch.embed_dim)
    with_skip, _ = fuse_transformer(fp32, arch.num_heads, arch.embed_dim, skip_layer_norm=True)
    builders: dict[str, tuple[Callable[[], onnx.ModelProto], bool]] = {
        "fp32": (lambda: fp32, False),
        "fp32 +SkipLN": (lambda: fp32, True),
        "fused fp32": (lambda: fused, False),
        "qdq (cpu)": (lambda: quantize_int8(fp32, calib), False),
        "dynamic, unfused": (lambda: quantize_dynamic_int8(fp32), False),
        "dynamic": (lambda: quantize_dynamic_int8(fused), False),
        "dynamic +SkipLN": (lambda: quantize_dynamic_int8(with_skip), True),
    }
    if conv_stem_nodes(fp32):
        builders["mixed"] = (lambda: quantize_mixed_int8(fp32, calib, arch.num_heads, arch.embed_dim), False)
        builders["mixed, whole stem"] = (lambda: quantize_mixed_int8(fp32, calib, arch.num_heads, arch.embed_dim,
                                                                     min_cosine=-1.0), False)
        builders["qdq+convs"] = (lambda: quantize_int8(fp32, calib, convs=True), False)
    out = {}
    for name, (build, skip_ln) in builders.items():
        try:
            out[name] = (build(), skip_ln)
        except Exception as err:  # noqa: BLE001 - a variant ONNX Runtime cannot build is a result, not a crash
            print(f"  {name}: not built: {type(err).__name__}: {err}", flush=True)
    return out, stats


def trained_like_biases(backbone: torch.nn.Module, seed: int = 0) -> None:
    """Give a random-init backbone's zero biases small random values (in place; speed benches only)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if name.endswith("bias") and not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def default_artifacts(root: Path, quick: bool) -> list[Path]:
    """Random ViT-S/14 at 224 px and the demo's student if ``make demo`` wrote it; ``quick``: the tiny model."""
    vits, tiny = _random_artifacts(root)
    if quick:
        return [tiny]
    return [vits] + ([DEMO_STUDENT] if (DEMO_STUDENT / "model.json").is_file() else [])


def knn_accuracy(session: Any, x: np.ndarray, train_y: torch.Tensor, test_y: torch.Tensor, pooling: str) -> float:
    """Top-1 k-NN accuracy of a graph: the first ``len(train_y)`` rows of ``x`` are the index."""
    out = run_session(session, x, 32)
    emb = pool(out[CLS_OUTPUT], out[MEAN_OUTPUT], pooling)
    pred = knn_predict(emb[:len(train_y)], train_y, emb[len(train_y):])
    return float((pred == test_y).double().mean())


def op_profile(model: onnx.ModelProto, skip_ln: bool, x: np.ndarray, threads: int, runs: int,
               warmup: int = 5) -> dict[str, float]:
    """Milliseconds per run by operator type, from ONNX Runtime's profiler: ``runs`` runs after ``warmup``.

    A session of its own, so the timed sessions run without the profiler's overhead.
    """
    with tempfile.TemporaryDirectory(prefix="dinoforge-profile-") as tmp:
        session = create_session(model.SerializeToString(), threads=threads, skip_layer_norm_fusion=skip_ln,
                                 profile_prefix=Path(tmp, "ort"))
        feed = {session.get_inputs()[0].name: x}
        for _ in range(warmup + runs):
            session.run([CLS_OUTPUT], feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = starts[warmup]  # node events before it belong to the warm-up runs
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first_timed:
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


Step = tuple[Callable[[], object], int]  # one timed call, and the images it embeds


def _steps(graphs: Graphs, sessions: dict[str, Any], x: np.ndarray, args: argparse.Namespace,
           pool: ThreadPoolExecutor | None) -> dict[tuple[str, int], Step]:
    """What to time per (variant, instances): one session on ``x``; with ``--instances N``, also N sessions of
    ``--threads / N`` threads each, run concurrently on ``x`` each (one run of the graph per thread)."""
    def run(s: Any) -> object:
        return s.run([CLS_OUTPUT], {s.get_inputs()[0].name: x})

    steps: dict[tuple[str, int], Step] = {(name, 1): (lambda s=s: run(s), args.batch) for name, s in sessions.items()}
    if pool is None:
        return steps
    n = args.instances
    for name, (model, flag) in graphs.items():
        group = [create_session(model.SerializeToString(), threads=max(1, args.threads // n),
                                skip_layer_norm_fusion=flag) for _ in range(n)]
        steps[(name, n)] = (lambda g=group: [f.result() for f in [pool.submit(run, s) for s in g]], n * args.batch)
    return steps


def _throughput(steps: dict[tuple[str, int], Step], args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """img/s of every step: ``--rounds`` rounds, each timing every step in turn (so machine drift hits all
    alike), median of ``--iters`` calls per round; the median over rounds."""
    per_round: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, (step, images) in steps.items():
            per_round[key].append(images / statistics.median(_time(step, args.iters)))
    return {key: statistics.median(v) for key, v in per_round.items()}


def bench_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of one artifact: img/s, speed-up, cosine and k-NN drop against fp32."""
    art = load_artifact(path)
    random_init = art.card.provenance.source == "random-init"
    if random_init:
        trained_like_biases(art.backbone)
    pre = art.card.preprocessing
    if args.resolution:
        resize = None if pre.resize_size is None else round(pre.resize_size * args.resolution / pre.size)
        try:
            pre = PreprocessConfig(**{**pre.model_dump(), "size": args.resolution, "resize_size": resize})
        except ValidationError as err:  # e.g. not a multiple of the patch size
            raise SystemExit(f"bench_int8.py: error: --resolution {args.resolution} for {path}: "
                             f"{err.errors()[0]['msg']}") from None
    hw = (pre.size, pre.size)
    images = load_images(default_image_dir(), args.batch + 32)
    x_all = pixels_to_input(to_pixels(images, pre, hw), pre).numpy()
    x, calib = np.ascontiguousarray(x_all[:args.batch]), x_all[-32:]
    fp32, _ = export_module(ExportableViT(art.backbone, hw))
    graphs, stats = variants(fp32, calib, art)
    knn = None
    if args.knn_images and (args.quick or not random_init):  # random weights: k-NN is meaningless, skip its cost
        train, train_y, test, test_y = load_fmnist_knn(limit=args.knn_images)
        knn = (pixels_to_input(to_pixels(train + test, pre, hw), pre).numpy(), train_y, test_y)
    sessions = {name: create_session(model.SerializeToString(), threads=args.threads, skip_layer_norm_fusion=flag)
                for name, (model, flag) in graphs.items()}
    rows: list[dict[str, Any]] = []
    ref = None
    for name, session in sessions.items():
        cls = run_session(session, x, args.batch)[CLS_OUTPUT]
        ref = cls if ref is None else ref
        row = {"variant": name, "bytes": graphs[name][0].ByteSize(),
               "min_cosine_vs_fp32": float(torch.nn.functional.cosine_similarity(cls, ref).min())}
        if knn is not None:
            row["knn_accuracy"] = knn_accuracy(session, knn[0], knn[1], knn[2], art.card.default_pooling)
        if args.profile:
            row["profile_ms"] = op_profile(graphs[name][0], graphs[name][1], x, args.threads, args.iters)
        rows.append(row)
    with ThreadPoolExecutor(args.instances) if args.instances > 1 else contextlib.nullcontext() as pool:
        speeds = _throughput(_steps(graphs, sessions, x, args, pool), args)
    for row in rows:
        row["img_per_s"] = speeds[(row["variant"], 1)]
        row["speedup_vs_fp32"] = row["img_per_s"] / rows[0]["img_per_s"]
        if args.instances > 1:
            row["img_per_s_instances"] = speeds[(row["variant"], args.instances)]
            row["speedup_vs_fp32_instances"] = row["img_per_s_instances"] / rows[0]["img_per_s_instances"]
        if knn is not None:
            row["knn_drop_pt"] = 100 * (rows[0]["knn_accuracy"] - row["knn_accuracy"])
        print(f"  {art.card.name:>16s} {row['variant']:24s} {row['img_per_s']:9.1f} img/s", flush=True)
    return {"artifact": art.card.name, "resolution": pre.size, "random_weights": random_init,
            "fused_operators": stats, "instances": args.instances, "rows": rows}


def table(result: dict[str, Any]) -> str:
    note = " (random weights: k-NN meaningless, speed only)" if result.get("random_weights") else ""
    n = result.get("instances", 1)
    extra = f" {f'img/s {n} inst':>13s} {'x fp32':>7s}" if n > 1 else ""
    lines = [f"{result['artifact']} at {result['resolution']} px{note}; fusions: {result['fused_operators']}",
             f"{'variant':24s} {'img/s':>9s} {'x fp32':>7s}{extra} {'min cos':>8s} {'k-NN drop pt':>12s} {'MB':>7s}"]
    for r in result["rows"]:
        drop = f"{r['knn_drop_pt']:12.2f}" if "knn_drop_pt" in r else f"{'-':>12s}"
        inst = f" {r['img_per_s_instances']:13.1f} {r['speedup_vs_fp32_instances']:7.2f}" if n > 1 else ""
        lines.append(f"{r['variant']:24s} {r['img_per_s']:9.1f} {r['speedup_vs_fp32']:7.2f}{inst} "
                     f"{r['min_cosine_vs_fp32']:8.5f} {drop} {r['bytes'] / 1e6:7.2f}")
    return "\n".join(lines)


def profile_table(result: dict[str, Any], top: int = 8) -> str:
    """Each graph's ``top`` operator types by milliseconds per run, with their share of its kernel time."""
    lines = [f"{result['artifact']} at {result['resolution']} px: ms per run by operator type (share)"]
    for r in result["rows"]:
        ops = r["profile_ms"]
        total = sum(ops.values())
        parts = ", ".join(f"{op} {ms:.2f} ({100 * ms / total:.0f}%)" for op, ms in list(ops.items())[:top])
        lines.append(f"{r['variant']:24s} {total:6.2f} ms: {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, action="append", default=[])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per graph and round (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--knn-images", type=int, default=1000, help="0 disables the k-NN check")
    parser.add_argument("--resolution", type=int, help="export at this size in px (default: the card's)")
    parser.add_argument("--profile", action="store_true", help="ONNX Runtime's time per operator type per graph")
    parser.add_argument("--instances", type=int, default=1,
                        help="also time N concurrent sessions of threads/N threads each (default 1: not)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 iterations, 40 k-NN images")
    args = parser.parse_args(argv)
    if args.resolution is not None and args.resolution < 1:
        parser.error("--resolution must be positive")
    if args.instances < 1 or args.instances > args.threads:
        parser.error(f"--instances must be between 1 and --threads ({args.threads})")
    if args.quick:
        args.iters, args.rounds, args.knn_images = 2, 1, min(args.knn_images, 40)
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("dinoforge.export.quantize").setLevel(logging.INFO)  # where `mixed` starts the int8 stem
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifact or default_artifacts(Path(tmp), args.quick)
        results = [bench_model(a, args) for a in artifacts]
    for result in results:
        print(table(result))
        if args.profile:
            print(profile_table(result))
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "threads": args.threads, "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
