"""``dinoforge dedup`` and ``dinoforge copy-head`` (argparse only; work is imported when a command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dinoforge.core.errors import ConfigError
from dinoforge.curate.linkage import LINKAGES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the copy-detection subcommands to the ``dinoforge`` parser."""
    p = subparsers.add_parser(
        "dedup", help="find copies and near-duplicates in an image folder, keep one image per group",
        description="Embed every image under INPUT with the copy descriptor (frozen MobileNetV2, GeM pooling, "
                    "learned projection), join images whose cosine similarity reaches the calibrated threshold and "
                    "keep the largest image of each group. Writes groups.csv/json, kept.csv (manifest of kept "
                    "files), groups.png (contact sheet) and report.json under --out; a rerun resumes.")
    p.add_argument("input", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (created; reused by a rerun)")
    p.add_argument("--threshold", type=float, help="cosine similarity that makes a copy (default: the calibrated one)")
    p.add_argument("--descriptor", help="head file of dinoforge copy-head (default: the shipped one)")
    p.add_argument("--k", type=int, default=16, help="neighbours searched per image (default 16)")
    p.add_argument("--linkage", choices=LINKAGES, help="kept: remove an image only when it is a near-duplicate "
                   "of an image kept; components: connected components (default: the descriptor's calibrated rule)")
    p.add_argument("--sheet-groups", type=int, default=40, help="groups drawn on the contact sheet")
    p.set_defaults(func=_dedup)

    p = subparsers.add_parser(
        "copy-head", help="train and calibrate the copy descriptor's projection on a photo collection",
        description="Embed the training photos of a dinoforge photos collection (split by file; the benchmark "
                    "side is never read) with strong copy augmentations, fit PCA whitening and an InfoNCE + KoLeo "
                    "linear head on the frozen MobileNetV2 features, calibrate the threshold, write the head file.")
    p.add_argument("--photos", required=True, help="output folder of dinoforge photos")
    p.add_argument("--out", required=True, help="head file to write (.npz)")
    p.add_argument("--views", type=int, default=2, help="augmented views per training image")
    p.add_argument("--size", type=int, default=224, help="input side of the frozen backbone in pixels (default 224)")
    p.add_argument("--max-images", type=int, help="train on this many photos (evenly spaced) instead of all")
    p.add_argument("--steps", type=int, default=1500, help="head training steps")
    p.add_argument("--cache", help="npz cache of the view features (reused by a rerun)")
    p.add_argument("--linkage", choices=LINKAGES, default="kept",
                   help="grouping rule the threshold is calibrated for, and that dedup then uses (default kept)")
    p.add_argument("--folds", type=int, default=4,
                   help="cross-fitting folds of the calibration (each calibrated on a head that never saw it)")
    p.add_argument("--min-precision", type=float, default=0.95,
                   help="precision of the simulated dedup that sets the threshold (default 0.95)")
    p.set_defaults(func=_copy_head)


def _dedup(args: argparse.Namespace) -> int:
    from dinoforge.curate.dedup_tool import run_dedup

    report = run_dedup(args.input, args.out, threshold=args.threshold, head=args.descriptor, k=args.k,
                       sheet_groups=args.sheet_groups, linkage=args.linkage)
    print(f"{report['images']} images: {report['groups']} groups of copies, {report['removed']} removed, "
          f"{report['kept']} kept (threshold {report['threshold']:.3f}, {report['linkage']} linkage) -> "
          f"{args.out}/kept.csv, groups.csv, groups.png")
    return 0


def _copy_head(args: argparse.Namespace) -> int:
    from dinoforge.curate.copyhead import HeadSettings, train_head
    from dinoforge.curate.dedup_tool import check_output

    if not 0.0 < args.min_precision <= 1.0:
        raise ConfigError(f"--min-precision must be in (0, 1], got {args.min_precision}")
    if args.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {args.folds}")
    if args.size < 32:
        raise ConfigError(f"--size must be at least 32 pixels, got {args.size}")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give the path of the head file to write (.npz)")
    check_output(out.parent)  # before the minutes of embedding, not after
    record = train_head(args.photos, args.out, views=args.views, size=args.size, cache=args.cache,
                        settings=HeadSettings(steps=args.steps), folds=args.folds, max_images=args.max_images,
                        min_precision=args.min_precision, linkage=args.linkage)
    print(f"wrote {args.out}: threshold {record['threshold']:.3f}: simulated dedups of "
          f"{record['calibration_images']} photos in {record['folds']} folds, each against a head that never saw "
          f"it, with {record['calibration_copies']} copies, find {record['copy_recall_at_threshold']:.3f} of them "
          f"at precision {record['precision_at_threshold']:.3f}")
    return 0
