"""Step 3 — relative deduplication: drop pool images that copy an evaluation image.

Semantics: a pool image is dropped when its cosine similarity to **any** evaluation image is ``>= threshold``
(its nearest evaluation image decides, so one k = 1 search per pool image suffices). The evaluation index
is exact (``Flat``) by default, which makes the guarantee hard: no kept pool image is within the threshold of
an evaluation image. With an approximate index the guarantee holds only up to its recall.

Outputs (``relative/``): ``removed.parquet`` (pool row, pool id, eval set, eval id, similarity),
``chunks/`` and ``report.json``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open, atomic_write_json
from dinoforge.core.index import ShardedVectors, SubsetVectors
from dinoforge.curate.config import RelativeDedupConfig
from dinoforge.curate.search import build_or_load, read_chunks, sharded_search
from dinoforge.curate.state import RunState


class _Leaks:
    def __init__(self, pool_rows: np.ndarray, threshold: float) -> None:
        self.pool_rows, self.threshold = pool_rows, threshold

    def __call__(self, q: np.ndarray, scores: np.ndarray, eval_rows: np.ndarray) -> dict[str, np.ndarray]:
        hit = (eval_rows[:, 0] >= 0) & (scores[:, 0] >= self.threshold)
        return {"row": self.pool_rows[q[hit]], "eval_row": eval_rows[hit, 0],
                "similarity": scores[hit, 0].astype(np.float32)}


def run_relative_dedup(state: RunState, pool: FeatureStore, feature: str, eval_sets: dict[str, FeatureStore],
                       candidates: np.ndarray, cfg: RelativeDedupConfig, chunk_rows: int) -> dict[str, Any]:
    """Search every candidate pool row against all evaluation images; returns the report.

    Args:
        state: the run.
        pool: pool features from the copy-detection model.
        feature: feature name in the stores.
        eval_sets: evaluation set name -> features (same model).
        candidates: sorted pool rows still kept after self-deduplication.
        cfg: threshold and index settings.
        chunk_rows: query rows per search chunk.
    """
    started = time.perf_counter()
    names = list(eval_sets)
    stores = [eval_sets[n] for n in names]
    arrays = [a for s in stores for a in s.part_arrays(feature)]
    evals = ShardedVectors(arrays)
    set_of = np.repeat(np.arange(len(names)), [s.num_rows for s in stores])  # [n_eval]
    eval_ids = [i for s in stores for i in s.table(["id"])["id"].to_pylist()]
    rows = np.arange(evals.num_rows, dtype=np.int64)
    index, index_report = build_or_load(state.path("relative", "index"), evals, rows, cfg.index, state.info)
    queries = SubsetVectors(pool.vectors(feature), candidates)
    chunks = sharded_search(index, queries, 1, state.root / "relative" / "chunks", state.info,
                            chunk_rows=chunk_rows, keep=_Leaks(candidates, cfg.threshold))
    sizes = {n: s.num_rows for n, s in zip(names, stores, strict=True)}
    report: dict[str, Any] = {"threshold": cfg.threshold, "eval_sets": sizes, "candidates": int(candidates.size),
                              "index": index_report}
    if state.info.is_main:
        hits = read_chunks(chunks)
        row = hits.get("row", np.zeros(0, np.int64))
        eval_row = hits.get("eval_row", np.zeros(0, np.int64))
        pool_ids = pool.table(["id"])["id"].to_pylist()
        table = pa.table({"row": row, "id": [pool_ids[i] for i in row],
                          "eval_set": [names[set_of[e]] for e in eval_row], "eval_id": [eval_ids[e] for e in eval_row],
                          "similarity": hits.get("similarity", np.zeros(0, np.float32))})
        with atomic_open(state.path("relative", "removed.parquet")) as handle:
            pq.write_table(table.sort_by("row"), handle)
        counts = np.bincount(set_of[eval_row], minlength=len(names))
        per_set = {n: int(c) for n, c in zip(names, counts, strict=True)}
        report.update(removed=int(row.size), removed_per_set=per_set, seconds=round(time.perf_counter() - started, 3))
        atomic_write_json(state.path("relative", "report.json"), report)
    return report
