"""``dinoforge eval knn|linear|retrieval`` (argparse only; the work is imported when a command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common(p: argparse.ArgumentParser, default_pooling: str) -> None:
    p.add_argument("--model", required=True, help="artifact directory, checkpoint file (.pth/.safetensors), "
                                                  "or 'pixels' (raw-pixel baseline)")
    p.add_argument("--pooling", type=_str_list, default=[default_pooling],
                   help=f"cls, mean, cls+mean, or several comma-separated (default {default_pooling})")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed-precision feature extraction")
    p.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="change the model's preprocessing contract, e.g. --preprocess size=28")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its ``knn``/``linear``/``retrieval`` subcommands to the ``dinoforge`` parser."""
    parser = subparsers.add_parser("eval", help="evaluate frozen features: k-NN, linear probe, retrieval")
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    p = tasks.add_parser("knn", help="weighted k-NN classification (DINOv2 protocol)")
    _common(p, "cls")
    p.add_argument("--train", required=True, help="training data spec (e.g. fmnist:train, folder:/data/train)")
    p.add_argument("--test", help="test data spec (omit with --leave-one-out)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="classify every --train image by all the others (small labelled sets, e.g. tuxpaint:eval)")
    p.add_argument("--ks", type=_int_list, default=[10, 20, 100, 200], help="neighbour counts (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p.set_defaults(func=_run)

    p = tasks.add_parser("linear", help="linear probe with an lr/wd sweep on a held-out part of train")
    _common(p, "cls+mean")
    p.add_argument("--train", required=True, help="training data spec")
    p.add_argument("--test", required=True, help="test data spec")
    p.add_argument("--lrs", type=_float_list, default=[1e-3, 1e-2, 1e-1],
                   help="learning rates (default 1e-3,1e-2,1e-1)")
    p.add_argument("--wds", type=_float_list, default=[0.0, 1e-4], help="weight decays (default 0,1e-4)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per classifier (default 30)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out part of train (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split and shuffling seed (default 0)")
    p.set_defaults(func=_run)

    p = tasks.add_parser("retrieval", help="retrieval recall@k of queries against a gallery")
    _common(p, "cls")
    p.add_argument("--query", required=True, help="query data spec")
    p.add_argument("--gallery", required=True, help="gallery data spec")
    p.add_argument("--ks", type=_int_list, default=[1, 5, 10], help="cut-offs (default 1,5,10)")
    p.add_argument("--match", choices=["label", "id"], default="label", help="what makes a gallery item relevant")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dinoforge.core.config import build_config
    from dinoforge.core.errors import DataError
    from dinoforge.core.eval.linear import LinearProbeConfig
    from dinoforge.core.eval.model import load_eval_model
    from dinoforge.core.eval.report import format_report
    from dinoforge.core.eval.runner import run_knn, run_linear, run_retrieval, write_report

    if args.eval_task == "knn" and (args.test is None) != args.leave_one_out:
        raise DataError("eval knn: give --test, or --leave-one-out without --test")
    model = load_eval_model(args.model, poolings=args.pooling, device=args.device, autocast=args.autocast,
                            preprocess_overrides=args.preprocess)
    common = {"batch_size": args.batch_size, "num_workers": args.num_workers, "progress": not args.no_progress}
    if args.eval_task == "knn":
        report = run_knn(model, args.train, args.test, ks=args.ks, temperature=args.temperature, **common)
    elif args.eval_task == "linear":
        cfg = build_config(LinearProbeConfig, {"lrs": args.lrs, "wds": args.wds, "epochs": args.epochs,
                                               "val_fraction": args.val_fraction, "seed": args.seed},
                           source="command line")
        report = run_linear(model, args.train, args.test, config=cfg, **common)
    else:
        report = run_retrieval(model, args.query, args.gallery, ks=args.ks, match=args.match, **common)
    print(format_report(report))
    if args.out:
        print(f"wrote {write_report(report, args.out)}")
    return 0
