"""Run several variants of a pretraining recipe side by side and compare their final k-NN accuracy.

Each variant is ``dinoforge pretrain --config RECIPE`` with its own overrides, in its own process and run
folder; up to ``--parallel`` run at once (on a GPU they share the card; on CPU use ``--parallel 1``). Every
variant trains the same number of steps, so on a GPU the sweep answers "which recipe learns most from the
2-core budget's images" in minutes; the winner must then be re-run on the 2 CPU cores for the acceptance
figure (docs/benchmarks.md#pretraining).

Usage::

    python bench/pretrain_sweep.py --recipe fmnist --device cuda --parallel 6 --workers 2 \\
        --variant base= --variant sk=model.centering=sinkhorn_knopp --out sweep.json
    python bench/pretrain_sweep.py --smoke     # seconds on CPU: the `tiny` recipe, 2 variants, 4 steps

A variant is ``NAME=KEY=VALUE[,KEY=VALUE...]`` (an empty list is the recipe as it is; commas inside ``[...]``
belong to a list value).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Variant:
    """One run of the sweep: a name and its recipe overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        if not name:
            raise SystemExit(f"error: variant {text!r} has no name (expected NAME=KEY=VALUE,...)")
        return cls(name, [o for o in _split_top_level(rest) if o])


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so a list value such as ``crops.color_jitter=[0.2,0.2,0,0]`` stays whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _command(args: argparse.Namespace, variant: Variant, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dinoforge.core.cli", "pretrain", "--config", args.recipe, f"run_dir={run_dir}",
            f"train.device={args.device}", f"data.num_workers={args.workers}", "monitor.progress=false",
            "knn.at_start=false", *args.set, *variant.overrides]


def _summary(variant: Variant, run_dir: Path, rc: int, seconds: float) -> dict:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = [r for r in records if "total_loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    last = steps[-1] if steps else {}
    return {"variant": variant.name, "overrides": variant.overrides, "rc": rc, "wall_s": round(seconds, 1),
            "steps": last.get("step"), "final_knn_top1": knn[-1][1] if knn else None, "knn_curve": knn,
            "teacher_entropy": last.get("teacher_entropy"), "total_loss": last.get("total_loss")}


def run_sweep(args: argparse.Namespace, variants: list[Variant]) -> list[dict]:
    """Launch the variants, at most ``args.parallel`` at a time; return one summary per variant."""
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    pending, running, results = list(variants), [], {}
    while pending or running:
        while pending and len(running) < args.parallel:
            v = pending.pop(0)
            log = (root / f"{v.name}.log").open("w")
            proc = subprocess.Popen(_command(args, v, root / v.name), stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((v, proc, time.perf_counter(), log))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            v, proc, t0, log = item
            log.close()
            running.remove(item)
            results[v.name] = _summary(v, root / v.name, proc.returncode, time.perf_counter() - t0)
            print(json.dumps(results[v.name]), flush=True)
    return [results[v.name] for v in variants]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist")
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,... (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="override applied to every variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="data loader processes per variant")
    parser.add_argument("--threads", type=int, default=2, help="OMP/torch threads per variant")
    parser.add_argument("--workdir", default="runs/sweep")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.threads < 1:
        parser.error("--parallel and --threads must be >= 1")
    if args.smoke:
        args.recipe, args.variant = "tiny", args.variant or ["base=", "sk=model.centering=sinkhorn_knopp"]
        args.set = [*args.set, "train.max_steps=4", "knn.every_steps=null", "knn.at_end=false"]
    variants = [Variant.parse(v) for v in args.variant] or [Variant("base")]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("error: variant names must be unique")
    results = run_sweep(args, variants)
    print("\n| variant | overrides | steps | final k-NN top-1 | teacher entropy | wall (s) |\n"
          "|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {' '.join(r['overrides']) or '(recipe)'} | {r['steps']} | {r['final_knn_top1']} "
              f"| {r['teacher_entropy']} | {r['wall_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"recipe": args.recipe, "device": args.device, "results": results}, indent=2))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
