"""``dinoforge serve build-head``: a k-NN gallery or a linear probe for ``/v1/classify``.

Features come from the core evaluation stack (:func:`dinoforge.core.eval.extract_features` over a
:mod:`dinoforge.core.data` source, at the artifact's preprocessing contract), so a served head classifies
exactly like ``dinoforge eval knn|linear`` measures. A held-out share of the data gives the accuracy stored
in ``head.json``; the head itself is then built on all of it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dinoforge.core.artifact import read_card
from dinoforge.core.data import open_source
from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.eval import (LinearProbeConfig, extract_features, knn_classify, linear_probe,
                                 load_eval_model)
from dinoforge.serve.heads import HeadCard, save_head


@dataclass
class LabelledFeatures:
    """Pooled features ``x [N, D]``, labels ``y [N]`` and class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


def labelled_features(args: argparse.Namespace, pooling: str) -> LabelledFeatures:
    """Extract ``pooling`` features of every readable labelled image of ``args.data``."""
    model = load_eval_model(args.model, poolings=(pooling,), device=args.device)
    source = open_source(args.data)
    feats = extract_features(model.extractor, source, preprocess=model.preprocess, batch_size=args.batch_size,
                             num_workers=args.num_workers, progress=not args.no_progress, desc="build-head")
    y = feats.labels
    if (y < 0).any():
        raise DataError(f"{args.data}: {int((y < 0).sum())} images have no label; a head needs labelled data "
                        "(a folder with one sub-folder per class, or a manifest with a label column)")
    classes = list(source.classes) if source.classes else [str(i) for i in range(int(y.max()) + 1)]
    if len(set(y.tolist())) < 2:
        raise DataError(f"{args.data}: a classification head needs at least two classes")
    return LabelledFeatures(feats[pooling], y, classes)


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = int(round(n * fraction))
    return order[held:], order[:held]


def _knn_head(data: LabelledFeatures, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    metrics: dict[str, float] = {}
    fit, held = _split(len(data.x), args.holdout, args.seed)
    if len(held):
        res = knn_classify(data.x[fit], data.y[fit], data.x[held], data.y[held], ks=(args.k,),
                           temperature=args.temperature, num_classes=len(data.classes))
        metrics = {"holdout_top1": res.top1[args.k], "holdout_top5": res.top5[args.k], "holdout_n": float(len(held))}
    return {"gallery": data.x.float().contiguous(), "labels": data.y.to(torch.int64)}, metrics


def _linear_head(data: LabelledFeatures, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    fit, held = _split(len(data.x), args.holdout, args.seed)
    if not len(held):
        raise ConfigError("a linear head needs --holdout > 0 (the held-out part measures its accuracy)")
    cfg = LinearProbeConfig(epochs=args.epochs, seed=args.seed)
    sweep = linear_probe(data.x[fit], data.y[fit], data.x[held], data.y[held], config=cfg,
                         num_classes=len(data.classes), device=args.device)
    # retrain on everything with the selected (lr, wd); the held-out figure above stays the honest one
    final_cfg = cfg.model_copy(update={"lrs": (sweep.best_lr,), "wds": (sweep.best_wd,)})
    final = linear_probe(data.x, data.y, data.x[held], data.y[held], config=final_cfg,
                         num_classes=len(data.classes), device=args.device)
    tensors = {"weight": final.classifier.weight.detach().float(), "bias": final.classifier.bias.detach().float()}
    metrics = {"holdout_top1": sweep.top1, "holdout_top5": sweep.top5, "holdout_n": float(len(held)),
               "best_lr": sweep.best_lr, "best_wd": sweep.best_wd}
    return tensors, metrics


def run_build_head(args: argparse.Namespace) -> int:
    """Build and write the head; prints its held-out accuracy."""
    if not 0.0 <= args.holdout < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1), got {args.holdout}")
    if args.k <= 0 or args.temperature <= 0:
        raise ConfigError("--k and --temperature must be positive")
    card = read_card(args.model)
    pooling = args.pooling or (card.default_pooling if args.kind == "knn" else "cls+mean")
    data = labelled_features(args, pooling)
    build = _knn_head if args.kind == "knn" else _linear_head
    tensors, metrics = build(data, args)
    head = HeadCard(kind=args.kind, classes=data.classes, pooling=pooling, feature_dim=int(data.x.shape[1]),
                    model_sha256=card.weights_sha256, model_name=card.name, k=args.k, temperature=args.temperature,
                    num_samples=len(data.x), data=str(args.data), metrics=metrics)
    out = save_head(args.out, head, tensors, overwrite=args.overwrite)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "no held-out measurement"
    print(f"wrote {out}: {args.kind} head, {len(data.classes)} classes, {len(data.x)} images, pooling {pooling} "
          f"({shown})")
    return 0
