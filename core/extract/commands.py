"""``dinoforge extract``: batch feature extraction into sharded, resumable outputs (argparse only here)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract`` to the ``dinoforge`` parser."""
    p = subparsers.add_parser(
        "extract", help="extract features of a folder / manifest / WebDataset into sharded files",
        description="Batch feature extraction: sharded float16/float32 outputs (npy or safetensors) plus a parquet "
                    "index of ids/paths. Resumable: rerun the same command after a crash. Multi-process: launch "
                    "with torchrun (each rank takes its units).")
    p.add_argument("--model", required=True, help="artifact directory or checkpoint file")
    p.add_argument("--input", required=True,
                   help="data source: DIR, MANIFEST (.txt/.csv/.parquet), WEBDATASET (s-{000..009}.tar), fmnist:...")
    p.add_argument("--output", required=True, help="output directory (resumed when it holds the same job)")
    p.add_argument("--shard-size", type=int, default=10_000, help="inputs per unit / rows per part (default 10000)")
    p.add_argument("--features", default="cls", help="comma list of cls,mean,cls+mean,patch (default cls)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images (default 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (torchrun: cuda -> cuda:LOCAL_RANK)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed-precision forward pass")
    p.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's preprocessing contract, e.g. --preprocess size=28")
    p.add_argument("--max-units", type=int, help="stop after this many units (rerun to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_extract)


def _extract(args: argparse.Namespace) -> int:
    from dinoforge.core.config import build_config
    from dinoforge.core.extract.config import ExtractConfig
    from dinoforge.core.extract.engine import run_extraction

    config = build_config(ExtractConfig, {
        "model": args.model, "input": args.input, "output": args.output, "shard_size": args.shard_size,
        "features": tuple(args.features.split(",")), "dtype": args.dtype, "format": args.format,
        "preprocess": tuple(args.preprocess), "batch_size": args.batch_size, "num_workers": args.num_workers,
        "device": args.device, "autocast": args.autocast, "progress": not args.no_progress,
        "max_units": args.max_units}, source="command line")
    result = run_extraction(config)
    rate = f"{result.images_per_second:.1f} img/s"
    print(f"extracted {result.rows_now} inputs ({result.bad_now} skipped) in {result.units_done_now} units, "
          f"{result.seconds:.1f} s, {rate}")
    if result.summary is not None:
        s = result.summary
        print(f"complete: {result.output} holds {s['rows']} rows of {', '.join(s['features'])} "
              f"({s['dtype']}, {s['format']}); {s['bad']} inputs skipped (listed in bad.parquet)")
    elif not result.complete:
        print(f"incomplete: some of {result.units_total} units are not done; rerun the same command to continue")
    return 0
