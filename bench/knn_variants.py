"""k-NN of models under evaluation choices the DINOv2 protocol fixes: test size, flip averaging, centring.

The protocol (cosine k-NN, temperature-weighted votes, CLS token at the training resolution) is what the
acceptance figures use. This script asks how much of a comparison with raw pixels hinges on it: for each
model and each test size it extracts the protocol feature of every image and of its horizontal mirror once,
then scores four variants with the same k-NN:

* ``protocol``: the feature as is;
* ``flip``: L2-normalised feature of the image plus that of its mirror (test-time flip averaging);
* ``centred``: the L2-normalised feature minus the mean over the training set, before the cosine;
* ``flip+centred``: both.

The same variants apply to raw pixels (``pixels``), so a gain that a trick gives one side only is visible.
Choose any setting on a split of the training set (``--train 'fmnist:train[0:50000]' --test
'fmnist:train[50000:60000]'``), not on the test set.

Usage::

    python bench/knn_variants.py pixels runs/fmnist/artifact --sizes 28,35
    python bench/knn_variants.py pixels runs/fmnist/artifact --train 'fmnist:train[0:50000]' \\
        --test 'fmnist:train[50000:60000]' --json variants.json

Result (2026-12-05) in docs/benchmarks.md#pretraining.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dinoforge.core.data import DataSource
    from dinoforge.core.eval.features import FeatureExtractor

VARIANTS = ("protocol", "flip", "centred", "flip+centred")


class WithMirror:
    """Wraps an extractor: its first feature for the images (``plain``) and for their mirrors (``mirror``)."""

    names = ("plain", "mirror")

    def __init__(self, inner: FeatureExtractor) -> None:
        self.inner = inner

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        first = self.inner.names[0]
        return {"plain": self.inner(pixels)[first], "mirror": self.inner(pixels.flip(-1))[first]}


def variant_features(plain: torch.Tensor, mirror: torch.Tensor, variant: str,
                     mean: torch.Tensor | None = None) -> torch.Tensor:
    """Features ``[N, D]`` of one variant from the image and mirror features ``[N, D]``.

    Args:
        mean: ``[D]`` training-set mean of the un-centred variant (required for the centred ones).
    """
    x = F.normalize(plain, dim=-1)
    if variant.startswith("flip"):
        x = x + F.normalize(mirror, dim=-1)
    if variant.endswith("centred"):
        if mean is None:
            raise ValueError(f"variant {variant!r} needs the training-set mean")
        x = x - mean
    return x


def score_variants(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], train_y: torch.Tensor,
                   test_y: torch.Tensor, *, k: int, temperature: float, num_classes: int) -> dict[str, float]:
    """k-NN top-1 (%) of every variant; ``train``/``test`` hold ``plain`` and ``mirror`` features."""
    from dinoforge.core.eval.knn import knn_classify

    out = {}
    for variant in VARIANTS:
        base = variant.removesuffix("centred").rstrip("+") or "protocol"
        mean = variant_features(train["plain"], train["mirror"], base).mean(0) if "centred" in variant else None
        a = variant_features(train["plain"], train["mirror"], variant, mean)
        b = variant_features(test["plain"], test["mirror"], variant, mean)
        result = knn_classify(a, train_y, b, test_y, ks=(k,), temperature=temperature, num_classes=num_classes)
        out[variant] = round(result.top1[k], 2)
    return out


def evaluate(spec: str, size: int | None, train_src: DataSource, test_src: DataSource, *, k: int,
             temperature: float) -> dict[str, float]:
    """Variant accuracies of one model at one test size (``None``: the model's own contract)."""
    from dinoforge.core.eval.features import extract_features
    from dinoforge.core.eval.model import load_eval_model

    model = load_eval_model(spec, preprocess_overrides=[f"size={size}"] if size else ())
    extractor = WithMirror(model.extractor)
    feats = [extract_features(extractor, src, preprocess=model.preprocess, batch_size=500, progress=False)
             for src in (train_src, test_src)]
    return score_variants(feats[0].features, feats[1].features, feats[0].labels, feats[1].labels, k=k,
                          temperature=temperature, num_classes=train_src.num_classes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="artifact directories, checkpoints or 'pixels'")
    p.add_argument("--sizes", default="", help="comma-separated test sizes (default: each model's contract; "
                   "raw pixels always use theirs)")
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    from dinoforge.core.errors import DinoforgeError
    from dinoforge.core.eval.knn import check_knn_settings
    from dinoforge.core.eval.model import PIXELS
    from dinoforge.core.eval.runner import open_pair
    from dinoforge.core.fileio import atomic_write_json

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()] or [None]
    except ValueError:
        sizes = [0]
    if any(s is not None and s <= 0 for s in sizes):
        print(f"error: --sizes must be comma-separated positive integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    if args.json and not Path(args.json).resolve().parent.is_dir():  # fail now, not after the extraction
        print(f"error: --json {args.json}: its folder does not exist", file=sys.stderr)
        return 2
    rows = []
    try:
        check_knn_settings((args.k,), args.temperature)  # fail now, not after the first extraction
        sources = open_pair(args.train, args.test)
        print(f"| model | size | {' | '.join(VARIANTS)} |\n|---|---:|{'---:|' * len(VARIANTS)}")
        for spec in args.models:
            for size in sizes if spec != PIXELS else [None]:
                acc = evaluate(spec, size, *sources, k=args.k, temperature=args.temperature)
                rows.append({"model": spec, "size": size, **acc})
                print(f"| {spec} | {size or 'contract'} | {' | '.join(f'{acc[v]:.2f}' for v in VARIANTS)} |",
                      flush=True)
    except DinoforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_json(args.json, {"train": args.train, "test": args.test, "k": args.k, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
