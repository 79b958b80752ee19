"""Paired k-NN comparison of two models on the same test set, with an exact McNemar test.

Two k-NN accuracies a fraction of a point apart on one test set may differ by chance. This script classifies
every test image with both models (DINOv2 protocol: cosine k-NN, temperature-weighted votes, first pooling of
each model, default CLS) and counts the discordant pairs: images model A gets right and B wrong, and the reverse.
The exact two-sided McNemar p-value is the binomial probability of a split at least that uneven.

Usage::

    python bench/knn_paired.py runs/fmnist/artifact pixels                 # full Fashion-MNIST 60k / 10k
    python bench/knn_paired.py A B --train "fmnist:train[~5000@0]" --test "fmnist:test[~2000@0]" --k 20

Result (2026-12-05) in docs/benchmarks.md#pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dinoforge.core.data import DataSource


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value for ``a_only`` vs ``b_only`` discordant pairs."""
    n, low = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n)


def predictions(spec: str, train_src: DataSource, test_src: DataSource, *, k: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted [M], labels [M])`` of k-NN with ``spec``'s features."""
    from dinoforge.core.eval.features import extract_features
    from dinoforge.core.eval.knn import knn_class_scores
    from dinoforge.core.eval.model import load_eval_model

    model = load_eval_model(spec)
    feats = [extract_features(model.extractor, src, preprocess=model.preprocess, batch_size=500, progress=False)
             for src in (train_src, test_src)]
    name = feats[0].names[0]
    scores = knn_class_scores(feats[0][name], feats[0].labels, feats[1][name], ks=(k,), temperature=temperature,
                              num_classes=train_src.num_classes)[k]  # [M, C]
    return scores.argmax(1), feats[1].labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", help="artifact directory, checkpoint or 'pixels'")
    p.add_argument("model_b", help="artifact directory, checkpoint or 'pixels'")
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    args = p.parse_args(argv)
    from dinoforge.core.errors import DinoforgeError
    from dinoforge.core.eval.runner import open_pair

    try:
        sources = open_pair(args.train, args.test)  # opened once, read by both models
        pred_a, labels = predictions(args.model_a, *sources, k=args.k, temperature=args.temperature)
        pred_b, _ = predictions(args.model_b, *sources, k=args.k, temperature=args.temperature)
    except DinoforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    right_a, right_b = pred_a == labels, pred_b == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    print(json.dumps({"k": args.k, "n_test": len(labels), "top1_a": round(right_a.float().mean().item() * 100, 2),
                      "top1_b": round(right_b.float().mean().item() * 100, 2), "a_right_b_wrong": a_only,
                      "b_right_a_wrong": b_only, "mcnemar_p": round(mcnemar_p(a_only, b_only), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
