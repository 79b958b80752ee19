"""Peak resident memory per rank: sharded meta-device init (FSDP2 over gloo) vs one process, printed as JSON.

Two cases, each measured in fresh processes (so a peak is that process's own, ``ru_maxrss``):

* ``build``: the SSL meta-architecture of a recipe (student + EMA teacher + heads). One process builds it the
  ordinary way; N torchrun ranks build it on the meta device, shard it and initialise their shards
  (:func:`dinoforge.pretrain.meta_init.build_sharded_meta_arch`).
* ``step``: the same builds plus AdamW and one full training step (teacher, student, losses, backward,
  clipping, AdamW, EMA) on a synthetic batch of small crops (the memory is the model's, not the activations').

Usage (one measurement at a time: a ViT-g/14 build needs ~10 GB in the single process)::

    python bench/bench_shard_memory.py --case build --recipe vitg14 --nproc 4
    python bench/bench_shard_memory.py --case step --recipe vitl14 --nproc 4
    python bench/bench_shard_memory.py --case step --recipe tiny --nproc 2     # seconds: checks the script
    python bench/bench_shard_memory.py --case step --recipe vitl14 --nproc 4 --set train.host_mmap_threshold_mib=null

``--set`` overrides the recipe on both sides; both apply the recipe's ``train.host_mmap_threshold_mib`` as the
trainer does (``core/hostmem.py``), so the last line measures glibc's default allocator behaviour instead.

Prints ``{"case", "recipe", "nproc", "single_mb", "ranks_mb": [...], "max_ratio"}``; ``max_ratio`` is the
largest rank's peak over the single process's peak. Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SMALL_CROPS = {"global": 28, "local": 14, "n_local": 2, "images": 2}  # 2x2 and 1x1 patch grids at patch 14


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synthetic_batch(cfg: object) -> dict:
    """A real collated batch (masks included) of random pixels at the small crop sizes."""
    import random

    import torch

    from dinoforge.pretrain.masking import MaskingGenerator, collate_data_and_cast, official_max_num_patches

    g, l_, n = SMALL_CROPS["global"], SMALL_CROPS["local"], SMALL_CROPS["n_local"]
    gen = torch.Generator().manual_seed(0)
    samples = [{"global_crops": [torch.rand(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.rand(3, l_, l_, generator=gen) for _ in range(n)]}
               for _ in range(SMALL_CROPS["images"])]
    patch = cfg.model.backbone.patch_size
    masks = MaskingGenerator(g // patch, max_num_patches=official_max_num_patches(g, patch))
    return dict(collate_data_and_cast(samples, generator=masks, rng=random.Random(0)))


def _step(meta: object, par: object, cfg: object) -> None:
    from dinoforge.pretrain.optim import build_optimizer
    from dinoforge.pretrain.spikes import SpikeConfig, SpikeDetector
    from dinoforge.pretrain.train_loop import make_precision, train_step

    import torch

    optimizer = build_optimizer(par.raw_student, cfg.optim)
    values = {"lr": 1e-4, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.04, "last_layer_lr": 1e-4}
    meta.train()
    train_step(meta, [_synthetic_batch(cfg)], values=values, optimizer=optimizer,
               precision=make_precision("fp32", torch.device("cpu")), clip_grad=3.0,
               detector=SpikeDetector(SpikeConfig(policy="off")), student=par.raw_student,
               teacher=par.raw_teacher, device=torch.device("cpu"))


def worker(case: str, recipe: str, overrides: list[str]) -> None:
    """Build (and step) once in this process; print this process's peak RSS (rank 0 prints every rank's)."""
    import torch
    import torch.distributed as dist

    from dinoforge.core.hostmem import set_mmap_threshold
    from dinoforge.core.runtime import init_runtime, seed_everything, shutdown_runtime
    from dinoforge.pretrain.config import load_pretrain_config
    from dinoforge.pretrain.meta_init import build_parallel_meta_arch

    runtime = init_runtime("cpu", threads=1)
    single = ["parallel.strategy=none"] if runtime.world_size == 1 else ["parallel.strategy=fsdp"]
    cfg = load_pretrain_config(recipe, ["run_dir=unused", *single, *overrides])
    set_mmap_threshold(cfg.train.host_mmap_threshold_mib)  # as the trainer does, on both sides
    seed_everything(cfg.seed)
    meta, par = build_parallel_meta_arch(cfg.model, cfg.parallel, world_size=runtime.world_size,
                                         device=torch.device("cpu"))
    if case == "step":
        _step(meta, par, cfg)
    peaks: list = [_peak_mb()]
    if runtime.distributed:
        peaks = [None] * runtime.world_size
        dist.all_gather_object(peaks, _peak_mb())
    if runtime.is_main:
        print(json.dumps({"strategy": par.strategy, "peaks_mb": peaks}))
    shutdown_runtime(runtime)  # its last barrier keeps gloo's worker threads from aborting the exit


def _run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("build", "step"), default="build")
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--only", choices=("single", "sharded"), help="measure one side (e.g. when memory is short "
                        "for a ViT-g measurement after another job); prints its peaks only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override on both sides, e.g. train.host_mmap_threshold_mib=null")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.case, args.recipe, args.set)
        return
    me = [str(Path(__file__).resolve()), "--worker", "--case", args.case, "--recipe", args.recipe,
          *(f"--set={kv}" for kv in args.set)]
    runs = {"single": [sys.executable, *me],
            "sharded": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                        *me]}
    if args.only:
        print(json.dumps({"case": args.case, "recipe": args.recipe, "side": args.only, **_run(runs[args.only])}))
        return
    single, sharded = _run(runs["single"]), _run(runs["sharded"])
    single_mb = single["peaks_mb"][0]
    print(json.dumps({"case": args.case, "recipe": args.recipe, "nproc": args.nproc,
                      "strategy": sharded["strategy"], "single_mb": round(single_mb),
                      "ranks_mb": [round(p) for p in sharded["peaks_mb"]],
                      "max_ratio": round(max(sharded["peaks_mb"]) / single_mb, 3)}, indent=1))


if __name__ == "__main__":
    main()
