"""``dinoforge curate`` and ``dinoforge copy-descriptor`` (argparse only; work is imported when a command runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the curation subcommands to the ``dinoforge`` parser."""
    p = subparsers.add_parser(
        "curate", help="curate a pretraining set from an uncurated pool (dedup, retrieval, balancing)",
        description="Run a curation recipe: embed -> self-dedup -> relative dedup -> retrieval -> balancing -> "
                    "manifest. Every step writes files under the recipe's output and is skipped or resumed on a "
                    "rerun. Launch with torchrun to split embedding and search over ranks.")
    p.add_argument("--config", required=True, help="curation recipe (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. dedup.threshold=0.8")
    p.set_defaults(func=_curate)

    p = subparsers.add_parser(
        "copy-descriptor", help="train a copy-detection descriptor (SSCD-style) for deduplication",
        description="Self-supervised training of a small ViT that maps copies of an image (crop, flip, colour "
                    "jitter, resize, JPEG) together; use the artifact as dedup.model of a curation recipe.")
    p.add_argument("--data", required=True, help="training images (data source spec), disjoint from test pools")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--config", help="YAML with DescriptorConfig fields")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. epochs=20 arch.depth=6")
    p.set_defaults(func=_descriptor)


def _curate(args: argparse.Namespace) -> int:
    from dinoforge.core.config import load_config
    from dinoforge.curate.config import CurateConfig
    from dinoforge.curate.pipeline import run_curation

    cfg = load_config(CurateConfig, args.config, args.overrides)
    report = run_curation(cfg)
    if report:
        print(f"curated {report['rows']} of {report['pool']} pool images -> {cfg.output}/{report['manifest']} "
              f"(by step {report['by_step']}); report: {cfg.output}/report.json")
        if "warning" in report:
            print(f"warning: {report['warning']}")
    return 0


def _descriptor(args: argparse.Namespace) -> int:
    from dinoforge.core.config import apply_overrides, build_config, read_yaml
    from dinoforge.curate.descriptor import DescriptorConfig, train_descriptor

    data = read_yaml(args.config) if args.config else {}
    data = apply_overrides({**data, "data": args.data, "out": args.out}, args.overrides)
    path = train_descriptor(build_config(DescriptorConfig, data, source=args.config or "command line"))
    print(f"wrote copy descriptor {path}")
    return 0
