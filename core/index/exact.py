"""Exact k-nearest-neighbour search over a streamed collection, and recall of approximate results.

Exact search reads the database one chunk at a time (a matrix product per chunk) and merges the running
top-k with faiss's heap, so it needs memory for one chunk plus ``[nq, k]`` results. It is the ground truth
the approximate indexes are tuned and checked against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from dinoforge.core.index.vectors import VectorSource, l2_normalize


def faiss_metric(metric: str) -> int:
    """faiss metric constant for ``cosine``/``ip`` (inner product) or ``l2``."""
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def higher_is_better(metric: str) -> bool:
    """True for similarity metrics (cosine, ip), False for distances (l2)."""
    return metric != "l2"


def exact_search(queries: np.ndarray, database: VectorSource, k: int, *, metric: str = "cosine",
                 chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every query against a streamed database.

    Args:
        queries: float32 ``[nq, d]`` (normalised here when ``metric == "cosine"``).
        database: the collection searched; its rows are the returned ids.
        k: neighbours per query (ids are -1 where the database has fewer than k rows).
        metric: ``cosine``, ``ip`` or ``l2`` (squared L2 distances are returned for ``l2``).
        chunk_rows: database rows per matrix product.

    Returns:
        ``scores [nq, k]`` float32 (best first) and ``ids [nq, k]`` int64.
    """
    queries = l2_normalize(queries) if metric == "cosine" else np.ascontiguousarray(queries, np.float32)
    keep_max = higher_is_better(metric)
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=keep_max)
    for start, chunk in database.iter_chunks(chunk_rows):
        if metric == "cosine":
            chunk = l2_normalize(chunk)
        kk = min(k, chunk.shape[0])
        scores, ids = faiss.knn(queries, chunk, kk, metric=faiss_metric(metric))  # [nq, kk]
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


@dataclass(frozen=True)
class RecallReport:
    """Recall@k of an approximate search against exact search on sampled queries."""

    k: int
    recall: float
    num_queries: int
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, *, approx_true_scores: np.ndarray | None = None,
                exact_scores: np.ndarray | None = None, higher_better: bool = True, tol: float = 1e-5) -> float:
    """Mean fraction of the exact top-k found by the approximate top-k.

    An approximate neighbour also counts when its true score ties the exact k-th score (within ``tol``): with
    duplicate vectors, exact search picks one of several equally good ids and any of them is correct.

    Args:
        approx_ids: int64 ``[nq, k]`` from the index under test.
        exact_ids: int64 ``[nq, k]`` ground truth.
        approx_true_scores: optional float32 ``[nq, k]`` exact scores of ``approx_ids`` (for ties).
        exact_scores: float32 ``[nq, k]`` ground-truth scores (needed with ``approx_true_scores``).
        higher_better: similarity (True) or distance (False) scores.
        tol: tie tolerance.
    """
    nq, k = exact_ids.shape
    hits = np.zeros(nq, dtype=np.int64)
    for q in range(nq):
        found = np.isin(approx_ids[q], exact_ids[q][exact_ids[q] >= 0]) & (approx_ids[q] >= 0)  # [k]
        if approx_true_scores is not None and exact_scores is not None:
            kth = exact_scores[q, k - 1]
            good = approx_true_scores[q] >= kth - tol if higher_better else approx_true_scores[q] <= kth + tol
            found |= good & (approx_ids[q] >= 0)
        valid = int((exact_ids[q] >= 0).sum())
        hits[q] = min(int(found.sum()), valid)
    valid_total = int((exact_ids >= 0).sum())
    return float(hits.sum() / valid_total) if valid_total else 1.0


def true_scores(queries: np.ndarray, database: VectorSource, ids: np.ndarray, metric: str) -> np.ndarray:
    """Exact scores of given result ids, float32 ``[nq, k]`` (NaN where the id is -1)."""
    flat = ids.reshape(-1)
    valid = flat >= 0
    vecs = np.zeros((flat.size, database.dim), dtype=np.float32)
    if valid.any():
        vecs[valid] = database.take(flat[valid])
    vecs = vecs.reshape(ids.shape[0], ids.shape[1], -1)  # [nq, k, d]
    if metric == "cosine":
        q = l2_normalize(queries)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=2, keepdims=True), 1e-12)
    else:
        q = np.ascontiguousarray(queries, np.float32)
    if metric == "l2":
        out = ((vecs - q[:, None, :]) ** 2).sum(axis=2)
    else:
        out = np.einsum("qkd,qd->qk", vecs, q)
    return np.where(ids >= 0, out, np.nan).astype(np.float32)
