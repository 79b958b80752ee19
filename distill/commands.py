"""Subcommand registration for this package (argparse only; work is imported when a command runs).

* ``dinoforge distill --config RECIPE [key=value ...]``: distil a frozen teacher into one or more students
  (or resume the run); RECIPE is a YAML file or a bundled recipe name (``tiny``, ``fmnist``,
  ``fmnist_head``, ``vits14_from_vitb14``, ``mnv2_photos``). Works the same under
  ``torchrun --nproc_per_node=N -m dinoforge.core.cli distill ...``.
* ``dinoforge distill-eval RUN_DIR``: teacher, students, ONNX exports and raw pixels on the tuxpaint
  leave-one-out and Fashion-MNIST k-NN protocols (:mod:`.evaluate`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


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

    p = subparsers.add_parser("distill-eval", help="k-NN of a distillation run's teacher, students, ONNX exports "
                              "and raw pixels (tuxpaint leave-one-out, Fashion-MNIST)")
    p.add_argument("run_dir", type=Path, help="distillation run directory")
    p.add_argument("--onnx", type=Path, action="append", default=[], help="also an ONNX export directory")
    p.add_argument("--artifact", type=Path, action="append", default=[],
                   help="also another model artifact (e.g. a pretraining run's, for a side-by-side table)")
    p.add_argument("--artifact-pooling", default="", metavar="P[,P]",
                   help="score --artifact models under these poolings (default: each card's own)")
    p.add_argument("--protocols", default="tuxpaint,fmnist", help="tuxpaint, fmnist or both (default both)")
    p.add_argument("--fmnist-train", default="fmnist:train", help="k-NN bank (default the full 60k)")
    p.add_argument("--fmnist-test", default="fmnist:test", help="queries (default the full 10k)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    p.add_argument("--out", type=Path, help="JSON file for the table (default RUN_DIR/eval.json)")
    p.set_defaults(func=_evaluate)


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


def _evaluate(args: argparse.Namespace) -> int:
    from dinoforge.distill.evaluate import evaluate_models, format_table, run_models, write_table

    poolings = [p.strip() for p in args.artifact_pooling.split(",") if p.strip()]
    models = run_models(args.run_dir, teacher=not args.no_teacher, pixels=not args.no_pixels, onnx=args.onnx,
                        artifacts=args.artifact, artifact_poolings=poolings)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    table = evaluate_models(models, protocols=protocols, fmnist=(args.fmnist_train, args.fmnist_test))
    print(format_table(table))
    out = args.out or args.run_dir / "eval.json"
    write_table(table, out)
    print(f"wrote {out}")
    return 0
