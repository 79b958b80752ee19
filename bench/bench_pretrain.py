"""Pretraining step throughput (img/s) and peak memory, per recipe and variant, measured side by side.

Every variant runs in a fresh child process (so its peak memory is its own): the model, optimizer and
data pipeline are built from a bundled recipe exactly as ``dinoforge pretrain`` builds them, a few batches are
prepared up front, and full optimizer steps (teacher, student, losses, backward, clipping, AdamW, EMA) are
timed after warm-up. Reported: median step time, images per second (global batch / median step time), the
data pipeline's own images per second, and peak memory (CPU: peak resident set size of the child; GPU: peak
allocated CUDA memory).

Usage::

    python bench/bench_pretrain.py                       # CPU: tiny and ViT-S/14, fp32 and bf16
    python bench/bench_pretrain.py --device cuda --recipes vits14,vitb14 --precision bf16 --compile off,on
    python bench/bench_pretrain.py --smoke               # seconds: tiny, 1 timed step (checks the script)
    python bench/bench_pretrain.py --fmnist runs/fmnist  # the Fashion-MNIST acceptance run (~30 min + k-NN)

``--fmnist RUN_DIR`` runs ``dinoforge pretrain --config fmnist`` (timed), then ``dinoforge eval knn`` on the full
60k / 10k sets for the pretrained teacher, the *same network at initialisation* (the run's step-0 teacher,
rebuilt from the recipe and seed) and raw pixels, with every pooling, and prints one table.

Results (with machine, versions and command) go to ``docs/benchmarks.md#pretraining``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Per-recipe overrides that keep a CPU benchmark short (batch per step, synthetic-free real data).
RECIPE_OVERRIDES = {
    "tiny": ["data.batch_size=64", "data.source=fmnist:train"],
    "fmnist": [],
    "vits14": ["data.batch_size=8", "data.source=fmnist:train"],
    "vitb14": ["data.batch_size=8", "data.source=fmnist:train"],
}


def _child(args: argparse.Namespace) -> dict:
    import torch

    from dinoforge.pretrain.config import load_pretrain_config
    from dinoforge.pretrain.train_loop import train_step
    from dinoforge.pretrain.pretrain_run import pretrain_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"run_dir={tempfile.mkdtemp(prefix='bench_pretrain_')}", f"train.device={args.device}",
                 f"train.precision={args.precision}", f"parallel.compile={args.compile == 'on'}",
                 "knn.at_end=false", "knn.every_steps=null", "monitor.progress=false",
                 *RECIPE_OVERRIDES.get(args.recipe, []), *args.set]
    cfg = load_pretrain_config(args.recipe, overrides)
    trainer = pretrain_trainer(cfg)
    trainer.parts.model.train()
    start = time.perf_counter()
    batches = [trainer.parts.batches[i] for i in range(3)]
    data_ips = 3 * trainer.global_batch / (time.perf_counter() - start)
    batches = [[{k: v.to(trainer.rt.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in micro] for micro in batches]
    times = []
    for i in range(args.warmup + args.steps):
        sync = torch.cuda.synchronize if trainer.rt.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        train_step(trainer.parts.model, batches[i % 3], values=trainer.schedules.at(i), optimizer=trainer.optimizer,
                   precision=trainer.precision, clip_grad=cfg.optim.clip_grad, detector=trainer.detector,
                   student=trainer.parts.student, teacher=trainer.parts.teacher, device=trainer.rt.device)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if trainer.rt.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"recipe": args.recipe, "device": args.device, "precision": args.precision, "compile": args.compile,
            "global_batch": trainer.global_batch, "crops": f"2x{cfg.crops.global_crops_size}+"
            f"{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}", "median_step_s": median,
            "img_per_s": trainer.global_batch / median, "data_img_per_s": data_ips, "peak_mem_mib": peak,
            "steps_timed": len(times), "threads": torch.get_num_threads()}


def _run_variant(recipe: str, precision: str, compile_: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe, "--precision", precision, "--compile", compile_,
           "--device", opts.device, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
           "--threads", str(opts.threads or 0), *itertools.chain.from_iterable(("--set", s) for s in opts.set)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        return {"recipe": recipe, "precision": precision, "compile": compile_, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dinoforge.core.cli", *args])
    if done.returncode != 0:  # its own message (e.g. a bad --set override) is already on stderr
        raise SystemExit(f"error: `dinoforge {args[0]}` failed with exit status {done.returncode}")


def _initial_teacher(run_dir: Path) -> Path:
    """The run's step-0 teacher (same seed, same construction order) written as an artifact."""
    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.pretrain.config import load_pretrain_config
    from dinoforge.pretrain.meta_arch import SSLMetaArch
    from dinoforge.core.runtime import seed_everything
    from dinoforge.pretrain.teacher_export import default_preprocess

    cfg = load_pretrain_config(run_dir / "config.yaml")
    seed_everything(cfg.seed)
    meta = SSLMetaArch(cfg.model)
    pre = default_preprocess(cfg.crops.global_crops_size, cfg.model.backbone.patch_size, cfg.crops.mean, cfg.crops.std)
    return save_artifact(run_dir / "initial_teacher", meta.teacher["backbone"], name="fmnist-random-init",
                         provenance=Provenance(source="random-init", details={"seed": cfg.seed}),
                         preprocessing=pre, overwrite=True)


def fmnist_acceptance(run_dir: Path, extra: list[str], *, train: bool = True) -> dict:
    """Pretrain with the fmnist recipe (unless ``train`` is false), then k-NN of the teacher, its random init and
    raw pixels."""
    start = time.perf_counter()
    if train:
        _cli("pretrain", "--config", "fmnist", f"run_dir={run_dir}", *extra)
    wall = time.perf_counter() - start
    models = {"pretrained": str(run_dir / "artifact"), "random-init": str(_initial_teacher(run_dir)),
              "pixels": "pixels"}
    results = {}
    for name, model in models.items():
        out = run_dir / f"knn_{name}.json"
        pooling = "cls" if model == "pixels" else "cls,mean,cls+mean"
        _cli("eval", "knn", "--model", model, "--train", "fmnist:train", "--test", "fmnist:test", "--pooling",
             pooling, "--ks", "10,20", "--no-progress", "--out", str(out))
        results[name] = json.loads(out.read_text())["results"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "total_loss" in r][-1]
    summary = {"wall_seconds": wall if train else None, "train_seconds": last["train_seconds"], "steps": last["step"],
               "images_seen": last["images_seen"], "knn_curve": [(r["step"], r["knn_top1"]) for r in records
                                                                if "knn_top1" in r], "knn": results}
    lines = ["| model | features | k=10 top-1 | k=20 top-1 |", "|---|---|---:|---:|"]
    for name, per_feature in results.items():
        for feature, res in per_feature.items():
            lines.append(f"| {name} | {feature} | {res['top1']['10']:.2f} | {res['top1']['20']:.2f} |")
    print("\n".join(lines))
    print(f"pretraining: {summary['steps']} steps, {summary['images_seen']} images, {summary['train_seconds']:.0f} s "
          f"of training steps" + (f", {wall:.0f} s wall (incl. start-up and in-run k-NN)" if train else ""))
    (run_dir / "acceptance.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _table(rows: list[dict]) -> str:
    lines = ["| recipe | device | precision | compile | global batch | crops | step (s, median) | img/s | "
             "data img/s | peak mem (MiB) |", "|---|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | | {r['precision']} | {r['compile']} | | | failed | | | |")
            continue
        lines.append(f"| {r['recipe']} | {r['device']} | {r['precision']} | {r['compile']} | {r['global_batch']} | "
                     f"{r['crops']} | {r['median_step_s']:.3f} | {r['img_per_s']:.1f} | {r['data_img_per_s']:.0f} | "
                     f"{r['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def _environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="tiny,vits14")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--compile", default="off", help="comma-separated: off, on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    p.add_argument("--json", type=Path, help="also write rows + environment as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny recipe, fp32, 1 timed step")
    p.add_argument("--fmnist", type=Path, metavar="RUN_DIR", help="run the Fashion-MNIST acceptance instead")
    p.add_argument("--eval-only", action="store_true", help="with --fmnist: evaluate a finished run, do not train "
                   "(re-running pretrain on a run stopped by max_minutes would resume it)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.compile = args.compile or "off"
        print(json.dumps(_child(args)))
        return 0
    if args.fmnist:
        fmnist_acceptance(args.fmnist, args.set, train=not args.eval_only)
        return 0
    if args.smoke:
        args.recipes, args.precision, args.compile, args.steps, args.warmup = "tiny", "fp32", "off", 1, 1
    rows = []
    for r, pr, c in itertools.product(args.recipes.split(","), args.precision.split(","), args.compile.split(",")):
        rows.append(_run_variant(r, pr, c, args))
        print("row:", json.dumps(rows[-1]), flush=True)  # kept in the log even if a later variant is killed
    print(_table(rows))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"\n{r['recipe']} {r['precision']} compile={r['compile']} failed:\n{r['error']}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"environment": _environment(), "rows": rows}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
