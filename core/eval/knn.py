"""Weighted k-NN classification, DINOv2 protocol.

Features are L2-normalised; a query's ``k`` nearest training samples by cosine similarity vote for their
class with weight ``exp(sim / T)`` (T = 0.07); summed votes rank the classes (top-1, top-5). The official code
takes a softmax over the ``max(k)`` similarities, which divides every weight of a query by the same positive
number: rankings, and so accuracies, are identical. Queries are processed in chunks so that only
``chunk_size x n_train`` similarities exist at a time (60k x 10k fits easily).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dinoforge.core.errors import DataError

log = logging.getLogger(__name__)
DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


@dataclass
class KnnResult:
    """Accuracies in percent per requested ``k`` (``k_used`` is ``k`` clamped to the training-set size)."""

    ks: tuple[int, ...]
    k_used: dict[int, int]
    top1: dict[int, float]
    top5: dict[int, float]
    temperature: float
    num_classes: int
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        """JSON-ready (integer keys become strings)."""
        out = asdict(self)
        for key in ("k_used", "top1", "top5"):
            out[key] = {str(k): v for k, v in out[key].items()}
        out["ks"] = list(self.ks)
        return out


def _check_labels(labels: torch.Tensor, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    missing = int((labels < 0).sum())
    if missing:
        raise DataError(f"k-NN needs labels: {missing} of {len(labels)} {what} samples have none")
    return labels


def check_knn_settings(ks: Sequence[int], temperature: float) -> None:
    """Reject neighbour counts and vote temperatures that no data could make valid.

    The k-NN functions call it; ``run_knn`` calls it before extracting any features, so a bad setting fails
    in a moment instead of after a long extraction.
    """
    if not ks or any(int(k) <= 0 for k in ks):
        raise DataError(f"k values must be positive, got {list(ks)}")
    # the votes are exp(sim / T): T <= 0 inverts or breaks them instead of sharpening them
    if not temperature > 0:
        raise DataError(f"k-NN vote temperature must be positive, got {temperature}")


def _resolve_ks(ks: Sequence[int], n_train: int) -> dict[int, int]:
    used = {int(k): min(int(k), n_train) for k in ks}
    for k, u in used.items():
        if u < k:
            log.warning("k=%d is larger than the %d training samples: using k=%d", k, n_train, u)
    return used


def _chunk_scores(queries: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, k_used: dict[int, int],
                  temperature: float, num_classes: int, self_start: int | None = None) -> dict[int, torch.Tensor]:
    """Vote sums ``{k: [m, C]}`` for normalised ``queries [m, D]`` against normalised ``train [N, D]``.

    ``self_start``: the queries are training rows ``self_start ...`` (leave-one-out), never their own neighbour.
    """
    sims = queries @ train.T  # [m, N]
    if self_start is not None:
        rows = torch.arange(len(queries), device=sims.device)
        sims[rows, rows + self_start] = -float("inf")
    top_sims, top_idx = sims.topk(max(k_used.values()), dim=1, largest=True, sorted=True)  # [m, K]
    top_labels = train_labels[top_idx]  # [m, K]
    weights = (top_sims / temperature).exp()  # [m, K]; |sim| <= 1 so at most e^(1/T), no overflow
    out = {}
    for k, used in k_used.items():
        scores = torch.zeros(len(queries), num_classes, dtype=weights.dtype, device=weights.device)
        out[k] = scores.scatter_add_(1, top_labels[:, :used], weights[:, :used])  # [m, C]
    return out


def _iter_chunks(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k_used: dict[int, int],
                 temperature: float, num_classes: int, chunk_size: int, device: str | torch.device | None,
                 exclude_self: bool = False) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    device = torch.device(device) if device is not None else train_x.device
    train = F.normalize(train_x.to(device, torch.float32), dim=1)  # [N, D]
    labels = train_y.to(device)
    for start in range(0, len(test_x), chunk_size):
        queries = F.normalize(test_x[start:start + chunk_size].to(device, torch.float32), dim=1)  # [m, D]
        yield start, _chunk_scores(queries, train, labels, k_used, temperature, num_classes,
                                   start if exclude_self else None)


def _num_classes(train_y: torch.Tensor, test_y: torch.Tensor | None, num_classes: int | None) -> int:
    seen = int(max(train_y.max(), test_y.max() if test_y is not None and len(test_y) else 0)) + 1
    if num_classes is not None and num_classes < seen:
        raise DataError(f"num_classes={num_classes} but labels go up to {seen - 1}")
    return num_classes or seen


def knn_class_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *,
                     ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                     num_classes: int | None = None, chunk_size: int = 256,
                     device: str | torch.device | None = None) -> dict[int, torch.Tensor]:
    """Per-class vote sums ``{k: [M, C]}`` (on CPU) for every test sample.

    Args:
        train_x: ``[N, D]`` training features; train_y: ``[N]`` labels.
        test_x: ``[M, D]`` query features.
    """
    train_y = _check_labels(train_y, "training")
    classes = _num_classes(train_y, None, num_classes)
    check_knn_settings(ks, temperature)
    k_used = _resolve_ks(ks, len(train_x))
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in k_used}
    for _, scores in _iter_chunks(train_x, train_y, test_x, k_used, temperature, classes, chunk_size, device):
        for k, s in scores.items():
            parts[k].append(s.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int = 256,
                 device: str | torch.device | None = None, leave_one_out: bool = False) -> KnnResult:
    """Top-1/top-5 accuracy (percent) of weighted k-NN for each ``k``.

    Args:
        train_x: ``[N, D]``; train_y: ``[N]`` labels in ``[0, C)``.
        test_x: ``[M, D]``; test_y: ``[M]``.
        ks: neighbour counts; temperature: vote temperature.
        num_classes: ``C`` (default: largest label + 1).
        chunk_size: test queries per similarity block.
        device: where to compute (default: the features' device).
        leave_one_out: the test set *is* the training set (same rows, same order); each sample is classified
            by the other ``N - 1`` (small labelled sets without a split).
    """
    if leave_one_out and (test_x.shape != train_x.shape or not torch.equal(test_y, train_y)):
        raise DataError("leave-one-out k-NN needs the test set to be the training set (same rows and labels)")
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"k-NN needs [N, D] and [M, D] features, got {list(train_x.shape)} and {list(test_x.shape)}")
    train_y, test_y = _check_labels(train_y, "training"), _check_labels(test_y, "test")
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise DataError("k-NN: features and labels have different lengths")
    classes = _num_classes(train_y, test_y, num_classes)
    check_knn_settings(ks, temperature)
    k_used = _resolve_ks(ks, len(train_x) - int(leave_one_out))
    correct1 = dict.fromkeys(k_used, 0)
    correct5 = dict.fromkeys(k_used, 0)
    top = min(5, classes)
    for start, scores in _iter_chunks(train_x, train_y, test_x, k_used, temperature, classes, chunk_size, device,
                                      leave_one_out):
        truth = test_y[start:start + chunk_size].to(next(iter(scores.values())).device)[:, None]  # [m, 1]
        for k, s in scores.items():
            best = s.topk(top, dim=1).indices  # [m, top]
            correct1[k] += int((best[:, :1] == truth).sum())
            correct5[k] += int((best == truth).any(dim=1).sum())
    n = len(test_y)
    return KnnResult(ks=tuple(k_used), k_used=k_used, top1={k: 100.0 * c / n for k, c in correct1.items()},
                     top5={k: 100.0 * c / n for k, c in correct5.items()}, temperature=temperature,
                     num_classes=classes, n_train=len(train_y), n_test=n)
