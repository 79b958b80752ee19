"""Subcommand registration for this package (argparse only; work is imported when a command runs).

* ``dinoforge distill --config RECIPE [key=value ...]``: distil a frozen teacher into one or more students
  (or resume the run); RECIPE is a YAML file or a bundled recipe name (``tiny``, ``fmnist``,
  ``fmnist_head``, ``vits14_from_vitb14``). Works the same under
  ``torchrun --nproc_per_node=N -m dinoforge.core.cli distill ...``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``dinoforge`` parser."""
    p = subparsers.add_parser("distill", help="distil a frozen teacher into smaller students (resumes a run_dir)",
                              description="Train students against a frozen teacher (DINOv2 head-based or "
                                          "feature distillation) with the pretraining machinery. Re-running the "
                                          "same command continues from the newest good checkpoint of run_dir.")
    p.add_argument("--config", required=True, metavar="RECIPE",
                   help="recipe YAML file or bundled recipe name (tiny, fmnist, fmnist_head, vits14_from_vitb14)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. run_dir=runs/d teacher.path=runs/fmnist/artifact train.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    from dinoforge.core.config import config_to_yaml
    from dinoforge.distill.config import load_distill_config

    cfg = load_distill_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from dinoforge.distill.trainer import distill_trainer

    result = distill_trainer(cfg).run()
    if result.artifact is not None:
        state = "stopped early" if result.stopped_early else "finished"
        print(f"{state} at step {result.steps}; student artifacts in {result.artifact}")
        last = result.last_metrics
        for student in cfg.students:
            knn = last.get(f"{student.name}/knn_top1")
            if knn is not None:
                ref = last.get("teacher/knn_top1")
                extra = f" (teacher {ref:.2f}%, ratio {knn / ref:.3f})" if ref else ""
                print(f"  {student.name}: k-NN top-1 {knn:.2f}%{extra}")
    return 0
