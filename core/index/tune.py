"""Recall of an index against exact search, and tuning of its search breadth to a recall target.

Both sample queries from the database itself unless given queries (self-search is what deduplication does;
retrieval passes its seed vectors). The ground truth is :func:`~dinoforge.core.index.exact.exact_search`
streamed over the database, so the check works on collections that do not fit in memory.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from dinoforge.core.index.config import IVF_KINDS
from dinoforge.core.index.exact import RecallReport, exact_search, higher_is_better, recall_at_k, true_scores
from dinoforge.core.index.index import VectorIndex
from dinoforge.core.index.vectors import VectorSource, sample_rows

log = logging.getLogger(__name__)


def _queries(database: VectorSource, queries: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    if queries is not None:
        rows = sample_rows(len(queries), n, seed)
        return np.ascontiguousarray(queries[rows], dtype=np.float32)
    return database.take(sample_rows(database.num_rows, n, seed + 1))


class _GroundTruth:
    """Exact top-k of sampled queries, computed once and reused for every candidate setting."""

    def __init__(self, index: VectorIndex, database: VectorSource, queries: np.ndarray | None, k: int) -> None:
        cfg = index.config
        self.k = k
        self.metric = cfg.metric
        self.database = database
        self.queries = _queries(database, queries, cfg.tune_queries, cfg.seed)
        start = time.perf_counter()
        self.scores, self.ids = exact_search(self.queries, database, k, metric=cfg.metric,
                                             chunk_rows=cfg.chunk_rows)
        log.info("exact ground truth for %d queries in %.1f s", len(self.queries), time.perf_counter() - start)

    def recall(self, index: VectorIndex) -> RecallReport:
        _, ids = index.search(self.queries, self.k)
        truth = true_scores(self.queries, self.database, ids, self.metric)
        value = recall_at_k(ids, self.ids, approx_true_scores=truth, exact_scores=self.scores,
                            higher_better=higher_is_better(self.metric))
        return RecallReport(k=self.k, recall=value, num_queries=len(self.queries),
                            params={"factory": index.plan.factory, **index.search_params})


def measure_recall(index: VectorIndex, database: VectorSource, *, queries: np.ndarray | None = None,
                   k: int = 10) -> RecallReport:
    """Recall@k of ``index`` (current search parameters) on ``config.tune_queries`` sampled queries.

    Args:
        index: the index under test; its ids must be ``database`` rows.
        database: the collection that was added to the index.
        queries: optional float ``[nq, d]`` query pool to sample from (default: database rows).
        k: depth of the comparison.
    """
    report = _GroundTruth(index, database, queries, k).recall(index)
    index.last_recall = report.to_dict()
    return report


def _candidates(index: VectorIndex) -> tuple[str, list[int]]:
    cfg = index.config
    if (index.plan.kind in IVF_KINDS and cfg.nprobe) or (index.plan.kind == "hnsw" and cfg.ef_search):
        return "", []  # fixed by the user: measure, do not tune
    if index.plan.kind in IVF_KINDS:
        nlist = index.plan.nlist or 1
        values = [1 << i for i in range(17) if (1 << i) < nlist] + [nlist]
        return "nprobe", values
    if index.plan.kind == "hnsw":
        return "ef_search", [16 << i for i in range(9)]
    return "", []


def _raise_k_factor(index: VectorIndex, truth: _GroundTruth, target: float, k: int) -> RecallReport:
    """Double the fast-scan index's re-ranking depth (up to 512) until the recall target is met."""
    k_factor = index.search_params.get("k_factor", index.config.k_factor)
    while True:
        k_factor *= 2
        index.set_search_params(k_factor=k_factor)
        report = truth.recall(index)
        log.info("k_factor=%d: recall@%d %.4f", k_factor, k, report.recall)
        if report.recall >= target or k_factor >= 512:
            return report


def tune_index(index: VectorIndex, database: VectorSource, *, queries: np.ndarray | None = None, k: int = 10,
               target: float | None = None) -> RecallReport:
    """Smallest ``nprobe`` / ``efSearch`` (doubling) whose recall@k reaches ``target``; sets it on the index.

    Exact indexes, and indexes whose ``nprobe`` / ``ef_search`` the config fixes, just report their recall.
    When no setting reaches the target, the most thorough one is kept and the report says the recall reached.
    """
    target = index.config.target_recall if target is None else target
    truth = _GroundTruth(index, database, queries, k)
    knob, values = _candidates(index)
    if not knob:
        report = truth.recall(index)
    else:
        report = None
        for value in values:
            index.set_search_params(**{knob: value})
            report = truth.recall(index)
            log.info("%s=%d: recall@%d %.4f", knob, value, k, report.recall)
            if report.recall >= target:
                break
    assert report is not None
    if knob and report.recall < target and index.plan.kind == "ivf_pq_fs":
        report = _raise_k_factor(index, truth, target, k)
    index.last_recall = {**report.to_dict(), "target": target}
    return report
