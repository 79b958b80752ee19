"""Subcommand registration for this package (argparse only; work is imported when a command runs).

* ``dinoforge pretrain --config RECIPE [key=value ...]``: train (or resume) a run; RECIPE is a YAML file or a
  bundled recipe name (``tiny``, ``fmnist``, ``vits14``, ``vitb14``, ``vitl14``, ``vitg14``). Works the same
  under ``torchrun --nproc_per_node=N -m dinoforge.core.cli pretrain ...``.
* ``dinoforge plot RUN_DIR``: PNG training curves into ``RUN_DIR/plots``.
* ``dinoforge pretrain-export CHECKPOINT --out DIR``: the teacher of a saved checkpoint (run dir, ``.ckpt`` file
  or sharded ``.dcp`` directory) as a model artifact, in one process (a sharded one is read teacher-only).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``dinoforge`` parser."""
    p = subparsers.add_parser("pretrain", help="DINOv2 self-supervised pretraining (resumes a run_dir)",
                              description="Train a DINOv2-style backbone from a recipe. Re-running the same "
                                          "command continues from the newest good checkpoint of run_dir.")
    p.add_argument("--config", required=True, metavar="RECIPE",
                   help="recipe YAML file or bundled recipe name (tiny, fmnist, vits14, vitb14, vitl14, vitg14)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. run_dir=runs/a train.max_steps=100 data.batch_size=32")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=_pretrain)

    p = subparsers.add_parser("pretrain-export", help="teacher of a training checkpoint -> model artifact",
                              description="Write the EMA teacher of a pretraining checkpoint as a model artifact, "
                                          "in one process; a sharded (DCP) checkpoint is read teacher-only.")
    p.add_argument("checkpoint", type=Path, help="run directory (newest good checkpoint), .ckpt file or .dcp dir")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--name", help="model name (default: dinoforge-pretrain-stepN)")
    p.add_argument("--no-heads", action="store_true", help="backbone only (no DINO / iBOT heads)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("plot", help="write PNG training curves of a pretraining run")
    p.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)


def _pretrain(args: argparse.Namespace) -> int:
    from dinoforge.core.config import config_to_yaml
    from dinoforge.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from dinoforge.pretrain.pretrain_run import pretrain_trainer

    result = pretrain_trainer(cfg).run()
    if result.artifact is not None:
        state = "stopped early" if result.stopped_early else "finished"
        extra = f", k-NN top-1 {result.last_metrics['knn_top1']:.2f}%" if "knn_top1" in result.last_metrics else ""
        print(f"{state} at step {result.steps}{extra}; teacher artifact: {result.artifact}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dinoforge.core.errors import ArtifactError
    from dinoforge.pretrain.teacher_export import export_checkpoint

    if args.out.exists() and not args.overwrite:
        raise ArtifactError(f"{args.out} already exists; choose another --out or pass --overwrite")
    path = export_checkpoint(args.checkpoint, args.out, name=args.name, include_heads=not args.no_heads)
    print(path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from dinoforge.pretrain.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
