"""One linear layer, fp32 against dynamic int8, on ONNX Runtime's CPU provider with 1 and 2 intra-op threads.

    python bench/bench_qgemm.py [--shape M,K,N ...] [--threads 1 2] [--iters 200] [--rounds 5] [--json OUT]
    python bench/bench_qgemm.py --quick     # smoke test: one small shape, 5 iterations, 1 round

What the int8 graphs of ``bench_int8.py`` are made of: ``y = x @ W + b`` with ``x`` ``[M, K]`` float32, as a
float ``MatMul`` + ``Add`` and as the ``DynamicQuantizeMatMul`` that ``--int8-scheme dynamic`` / ``mixed`` write
(``x`` quantized to uint8 at run time, ``W`` per-channel int8, float output; made by the export's own
:func:`quantize_dynamic_int8`). Default shapes: the four linear
layers of the demo student at batch 8 (50 tokens x 192 channels: qkv, proj, fc1, fc2) and of ViT-S/14 at 224 px
(197 tokens x 384). Each (shape, threads, form) is timed in ``--rounds`` interleaved rounds of ``--iters`` runs;
the median over rounds of each round's median. Printed: microseconds, GMAC/s, int8 over fp32, and how much a
second thread gains for each form. It isolates the kernel from the rest of the graph (docs/edge.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from bench_export import _time
from onnx import TensorProto, helper, numpy_helper

from dinoforge.core.ort_session import create_session
from dinoforge.export.quantize import quantize_dynamic_int8

STUDENT = [(400, 192, 576), (400, 192, 192), (400, 192, 768), (400, 768, 192)]  # qkv, proj, fc1, fc2
VIT_S = [(1576, 384, 1152), (1576, 384, 384), (1576, 384, 1536), (1576, 1536, 384)]


def graphs(m: int, k: int, n: int, seed: int = 0) -> dict[str, bytes]:
    """``fp32`` (``MatMul`` + ``Add``) of one random linear layer, and ``int8``: that graph through
    :func:`quantize_dynamic_int8`, as the export quantizes it (ONNX Runtime runs it as ``DynamicQuantizeMatMul``)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)  # [K, N]
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)  # [N]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="linear"), helper.make_node("Add", ["t", "b"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return {"fp32": fp32.SerializeToString(), "int8": quantize_dynamic_int8(fp32).SerializeToString()}


def bench(shapes: list[tuple[int, int, int]], threads: list[int], iters: int, rounds: int) -> list[dict[str, Any]]:
    """Median microseconds of every (shape, threads, form), timed in interleaved rounds."""
    runs: dict[tuple[tuple[int, int, int], int, str], Any] = {}
    for shape in shapes:
        x = np.random.default_rng(1).standard_normal(shape[:2]).astype(np.float32)  # [M, K]
        for t in threads:
            for form, model in graphs(*shape).items():
                runs[(shape, t, form)] = (create_session(model, threads=t), x)
    per_round: dict[tuple[tuple[int, int, int], int, str], list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (session, x) in runs.items():
            times = _time(lambda s=session, x=x: s.run(None, {"x": x}), iters)
            per_round[key].append(statistics.median(times) * 1e6)
    return [{"m": s[0], "k": s[1], "n": s[2], "threads": t, "form": f, "us": statistics.median(v),
             "gmac_per_s": s[0] * s[1] * s[2] / statistics.median(v) / 1e3} for (s, t, f), v in per_round.items()]


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, threads): both forms, int8 over fp32, and each form's gain from the extra threads."""
    us = {(r["m"], r["k"], r["n"], r["threads"], r["form"]): r["us"] for r in rows}
    least = min(r["threads"] for r in rows)
    lines = [f"{'M x K x N':>18s} {'threads':>7s} {'fp32 us':>9s} {'int8 us':>9s} {'int8 GMAC/s':>11s} "
             f"{'int8 x fp32':>11s} {'fp32 thread gain':>16s} {'int8 thread gain':>16s}"]
    for r in rows:
        if r["form"] != "int8":
            continue
        m, k, n, t = r["m"], r["k"], r["n"], r["threads"]
        fp32, int8 = us[(m, k, n, t, "fp32")], r["us"]
        gains = [us[(m, k, n, least, form)] / us[(m, k, n, t, form)] for form in ("fp32", "int8")]
        lines.append(f"{f'{m} x {k} x {n}':>18s} {t:7d} {fp32:9.1f} {int8:9.1f} {r['gmac_per_s']:11.0f} "
                     f"{fp32 / int8:11.2f} {gains[0]:16.2f} {gains[1]:16.2f}")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,K,N (three integers), got {text!r}") from None
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"M, K and N must be positive, got {text!r}")
    return m, k, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, action="append", default=[], help="M,K,N (repeatable)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="one small shape, 5 iterations, 1 round")
    args = parser.parse_args(argv)
    if min(args.threads) < 1:
        parser.error("--threads must be positive")
    shapes = args.shape or ([(64, 32, 48)] if args.quick else STUDENT + VIT_S)
    iters, rounds = (5, 1) if args.quick else (args.iters, args.rounds)
    rows = bench(shapes, sorted(set(args.threads)), iters, rounds)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
