"""Copy-detection metrics of the DISC21 kind: micro average precision and recall at a precision.

A method gives a score for every (query, reference) pair (higher = more likely a copy). Each query keeps its
``k`` best-scoring references as predictions; all predictions of all queries are ranked together by score,
so one threshold serves every query, as a deduplication tool uses one. Precision at a rank is the fraction of
true pairs above it; recall is the fraction of the queries *that have an original* whose true pair is above
it. Distractor queries (no original among the references) can only add false positives.

* ``muap``: micro average precision, the sum over the true pairs in rank order of the precision at their
  rank, divided by the number of queries with an original (DISC21's ``μAP``);
* ``recall_at_p90``: the largest recall at which precision is still ``>= 0.90``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_pairs(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best references of each query of ``scores [Q, R]``: ``(query [m], ref [m], score [m])``."""
    k = min(k, scores.shape[1])
    refs = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [Q, k]
    queries = np.repeat(np.arange(scores.shape[0]), k)
    refs = refs.reshape(-1)
    return queries, refs, scores[queries, refs]


def pr_curve(score: np.ndarray, correct: np.ndarray, num_positive: int) -> tuple[np.ndarray, np.ndarray]:
    """``(precision [m], recall [m])`` after each prediction of the global ranking (ties broken pessimistically:
    within equal scores wrong predictions come first)."""
    order = np.lexsort((correct, -score))  # by score descending, wrong before right among ties
    hits = np.cumsum(correct[order])
    precision = hits / np.arange(1, hits.size + 1)
    recall = hits / max(1, num_positive)
    return precision, recall


def micro_ap(score: np.ndarray, correct: np.ndarray, num_positive: int) -> float:
    """DISC21 micro AP of predictions ``score [m]`` with truth ``correct [m]`` (bool)."""
    if num_positive == 0:
        return float("nan")
    precision, recall = pr_curve(score, correct, num_positive)
    steps = np.diff(np.concatenate([[0.0], recall]))  # 1/num_positive at each true pair, else 0
    return float((precision * steps).sum())


def recall_at_precision(score: np.ndarray, correct: np.ndarray, num_positive: int, target: float = 0.9) -> float:
    """Largest recall reached while precision is ``>= target`` (0 when never)."""
    precision, recall = pr_curve(score, correct, num_positive)
    ok = precision >= target
    return float(recall[ok].max()) if ok.any() else 0.0


def evaluate(scores: np.ndarray, truth: np.ndarray, families: Sequence[str], k: int = 10) -> dict[str, Any]:
    """Overall and per-family ``muap`` and ``recall_at_p90``.

    Args:
        scores: ``[Q, R]`` similarity of every query to every reference.
        truth: ``[Q]`` reference index of each query's original, ``-1`` for distractor queries.
        families: ``[Q]`` edit family of each query (distractors carry the family of their own edit, so a
            family's figures include its share of distractors).
        k: predictions kept per query.
    """
    q, r, s = top_pairs(scores, k)
    correct = truth[q] == r
    fam = np.asarray(families)

    def block(mask_q: np.ndarray) -> dict[str, float]:
        keep = mask_q[q]
        positives = int((truth[mask_q] >= 0).sum())
        return {"muap": micro_ap(s[keep], correct[keep], positives),
                "recall_at_p90": recall_at_precision(s[keep], correct[keep], positives),
                "queries": int(mask_q.sum()), "with_original": positives}

    out = {"overall": block(np.ones(len(truth), bool))}
    out["families"] = {name: block(fam == name) for name in dict.fromkeys(families)}
    return out


__all__ = ["evaluate", "micro_ap", "pr_curve", "recall_at_precision", "top_pairs"]
