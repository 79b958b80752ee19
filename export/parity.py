"""Parity of an exported graph against the PyTorch artifact, on real images.

Every metric is computed from the same uint8 pixels (see :mod:`.parity_data`): the reference is
``backbone.forward_features`` (official position-embedding interpolation) on the normalised pixels; the graph
gets normalised float pixels or the raw uint8 pixels, as its input contract says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.config import StrictModel
from dinoforge.core.onnx_contract import CLS_OUTPUT, EMBEDDING_OUTPUTS, MEAN_OUTPUT

KNN_K = 10
KNN_TEMPERATURE = 0.07


class ParityThresholds(StrictModel):
    """Pass/fail thresholds of the parity report (``--threshold KEY=VALUE``)."""

    fp32_min_cosine: float = Field(0.9999, ge=-1, le=1)
    fp16_min_cosine: float = Field(0.999, ge=-1, le=1)
    int8_min_cosine: float = Field(0.99, ge=-1, le=1)
    max_knn_drop_pt: float = Field(0.5, description="k-NN top-1 accuracy drop vs PyTorch, in points")

    def min_cosine(self, precision: str) -> float:
        """Cosine threshold of a precision."""
        return float(getattr(self, f"{precision}_min_cosine"))


@torch.no_grad()
def reference_outputs(backbone: DinoVisionTransformer, x: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """PyTorch reference embeddings.

    Args:
        x: normalised float32 ``[N, 3, H, W]``.

    Returns:
        ``cls_embedding [N, D]`` and ``mean_embedding [N, D]``.
    """
    cls, mean = [], []
    prefix = backbone.num_prefix_tokens
    for i in range(0, len(x), batch):
        tokens = backbone.forward_features(x[i:i + batch])  # [b, 1 + R + h*w, D]
        cls.append(tokens[:, 0])
        mean.append(tokens[:, prefix:].mean(dim=1))
    return {CLS_OUTPUT: torch.cat(cls), MEAN_OUTPUT: torch.cat(mean)}


def run_session(session: Any, inputs: np.ndarray, batch: int) -> dict[str, torch.Tensor]:
    """Run an onnxruntime session over ``inputs`` in batches; returns the embedding outputs ``[N, D]``."""
    name = session.get_inputs()[0].name
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in EMBEDDING_OUTPUTS}
    for i in range(0, len(inputs), batch):
        outs = session.run(list(EMBEDDING_OUTPUTS), {name: inputs[i:i + batch]})
        for key, value in zip(EMBEDDING_OUTPUTS, outs, strict=True):
            chunks[key].append(value)
    return {k: torch.from_numpy(np.concatenate(v)).float() for k, v in chunks.items()}


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Row-wise cosine (min/mean) and max abs error of ``[N, D]`` embeddings."""
    cos = F.cosine_similarity(ours.double(), ref.double(), dim=-1)  # [N]
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_error": float((ours - ref).abs().max())}


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Top-1 of the DINOv2 weighted k-NN (``core.eval.knn``, cosine, ``exp(sim / 0.07)`` votes, k = 10).

    Args:
        train: ``[N, D]`` index embeddings; train_labels: int64 ``[N]``; queries: ``[M, D]``.

    Returns:
        Predicted labels ``[M]``.
    """
    from dinoforge.core.eval.knn import knn_class_scores

    scores = knn_class_scores(train.float(), train_labels, queries.float(), ks=(KNN_K,),
                              temperature=KNN_TEMPERATURE)
    return next(iter(scores.values())).argmax(dim=1)


def knn_report(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
               train_labels: torch.Tensor, test_labels: torch.Tensor) -> dict[str, float]:
    """k-NN top-1 agreement of two embeddings (each ``(index [N, D], queries [M, D])``), accuracies, drop in points.

    Each embedding is classified against its own index, as a deployment would build its index with the
    exported model.
    """
    pred_ours = knn_predict(ours[0], train_labels, ours[1])
    pred_ref = knn_predict(ref[0], train_labels, ref[1])
    acc_ours = float((pred_ours == test_labels).double().mean())
    acc_ref = float((pred_ref == test_labels).double().mean())
    return {"n_index": len(train_labels), "n_queries": len(test_labels), "k": KNN_K,
            "top1_agreement": float((pred_ours == pred_ref).double().mean()),
            "accuracy": acc_ours, "reference_accuracy": acc_ref, "drop_pt": 100.0 * (acc_ref - acc_ours)}


def time_session(session: Any, inputs: np.ndarray, batch: int = 16, repeats: int = 5) -> dict[str, float]:
    """Median CPU time per image of one batch (after one warm-up run)."""
    name = session.get_inputs()[0].name
    sample = inputs[:batch]
    session.run(None, {name: sample})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: sample})
        times.append(time.perf_counter() - start)
    per_image = float(np.median(times)) / len(sample)
    return {"batch": len(sample), "ms_per_image": 1000.0 * per_image, "images_per_s": 1.0 / per_image}


@dataclass
class GateResult:
    """One pass/fail check of the report."""

    name: str
    value: float
    threshold: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"check": self.name, "value": self.value, "threshold": self.threshold, "passed": self.passed}


def gate(section: dict[str, Any], precision: str, thresholds: ParityThresholds) -> list[GateResult]:
    """Turn one graph's metrics into pass/fail checks."""
    min_cos = thresholds.min_cosine(precision)
    checks = []
    for run in ("batch16", "batch1"):
        for output in EMBEDDING_OUTPUTS:
            value = section[run][output]["min_cosine"]
            checks.append(GateResult(f"{run}.{output}.min_cosine", value, min_cos, value >= min_cos))
    if "knn" in section:
        drop = section["knn"]["drop_pt"]
        checks.append(GateResult("knn.drop_pt", drop, thresholds.max_knn_drop_pt,
                                 drop <= thresholds.max_knn_drop_pt))
    return checks
