"""Step 2 — self-deduplication of the pool.

1. Exact pass (optional): images whose decoded pixels hash the same (``content_hash`` of the extraction
   index) are joined to the first of them; only the first copy is indexed.
2. Near-duplicate pass: the k-NN graph of the L2-normalised embeddings (``k`` neighbours per image through
   the index layer), keeping the edges with cosine similarity ``>= threshold``.
3. Groups of both edge sets (:mod:`~.linkage`): connected components by default (union-find; each keeps its
   first image, the lowest pool row), or ``linkage: kept`` (a row is dropped only when it is itself a
   near-duplicate of an earlier row that is kept).

Outputs (``dedup/``): ``removed.parquet`` (pool row, id, component root, reason ``exact``/``near``),
``components.parquet`` (root, size; components of two or more images), ``edges/chunk-*.npz`` (the kept
edges: ``a``, ``b``, ``similarity``), the saved index and ``report.json``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open, atomic_write_json
from dinoforge.core.index import SubsetVectors
from dinoforge.curate.config import DedupConfig
from dinoforge.curate.search import build_or_load, read_chunks, sharded_search
from dinoforge.curate.state import RunState
from dinoforge.curate.linkage import group_edges
from dinoforge.curate.unionfind import component_sizes


def exact_groups(hashes: list[str | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(first, other)`` joining every row to the first row with the same content hash.

    Rows without a hash (``None``) join nothing.

    Returns:
        ``first [m]`` and ``other [m]`` int64 pool rows (``other`` are the rows the exact pass drops).
    """
    codes, _ = pd.factorize(pd.Series(hashes, dtype=object), use_na_sentinel=True)  # None -> -1
    rows = np.arange(codes.size, dtype=np.int64)
    valid = codes >= 0
    first = np.full(int(codes.max(initial=-1)) + 1, codes.size, dtype=np.int64)
    np.minimum.at(first, codes[valid], rows[valid])
    firsts = first[codes[valid]]
    dup = firsts != rows[valid]
    return firsts[dup], rows[valid][dup]


class _EdgeFilter:
    """Keep k-NN edges with similarity >= threshold, excluding self-matches."""

    def __init__(self, query_rows: np.ndarray, threshold: float) -> None:
        self.query_rows, self.threshold = query_rows, threshold

    def __call__(self, q: np.ndarray, scores: np.ndarray, pool_rows: np.ndarray) -> dict[str, np.ndarray]:
        a = np.broadcast_to(self.query_rows[q][:, None], pool_rows.shape)  # [m, k]
        keep = (pool_rows >= 0) & (pool_rows != a) & (scores >= self.threshold)
        return {"a": a[keep].astype(np.int64), "b": pool_rows[keep].astype(np.int64),
                "similarity": scores[keep].astype(np.float32)}


def _write_outputs(state: RunState, roots: np.ndarray, exact_rows: np.ndarray, ids: list[str]) -> dict[str, int]:
    n = roots.size
    removed = np.nonzero(roots != np.arange(n))[0]
    reason = np.where(np.isin(removed, exact_rows), "exact", "near")
    table = pa.table({"row": removed, "id": [ids[i] for i in removed], "component": roots[removed],
                      "reason": reason})
    with atomic_open(state.path("dedup", "removed.parquet")) as handle:
        pq.write_table(table, handle)
    sizes = component_sizes(roots)
    multi = np.nonzero((roots == np.arange(n)) & (sizes > 1))[0]
    with atomic_open(state.path("dedup", "components.parquet")) as handle:
        pq.write_table(pa.table({"root": multi, "size": sizes[multi]}), handle)
    return {"removed": int(removed.size), "removed_exact": int((reason == "exact").sum()),
            "removed_near": int((reason == "near").sum()), "components_multi": int(multi.size),
            "largest_component": int(sizes.max()) if n else 0}


def run_self_dedup(state: RunState, store: FeatureStore, feature: str, cfg: DedupConfig) -> dict[str, Any]:
    """Run steps 1-3 (search sharded over ranks); returns the report."""
    started = time.perf_counter()
    table = store.table(["id", "content_hash"])
    n = table.num_rows
    exact_first, exact_rows = exact_groups(table["content_hash"].to_pylist()) if cfg.exact else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64))
    unique = np.setdiff1d(np.arange(n, dtype=np.int64), exact_rows, assume_unique=True)  # sorted
    report: dict[str, Any] = {"pool": n, "k": cfg.k, "threshold": cfg.threshold, "linkage": cfg.linkage,
                              "exact_pass": cfg.exact, "near_pass": cfg.near}
    chunks: list = []
    if cfg.near:
        source = SubsetVectors(store.vectors(feature), unique)
        pool_index, report["index"] = build_or_load(state.path("dedup", "index"), source, unique, cfg.index,
                                                    state.info)
        searched = time.perf_counter()
        chunks = sharded_search(pool_index, source, cfg.k + 1, state.root / "dedup" / "edges", state.info,
                                chunk_rows=cfg.chunk_rows, keep=_EdgeFilter(unique, cfg.threshold))
        report["search_seconds"] = round(time.perf_counter() - searched, 3)
    if state.info.is_main:
        roots, edges = group_edges(n, (read_chunks([path]) for path in chunks), cfg.linkage,
                                   (exact_first, exact_rows))
        report.update(_write_outputs(state, roots, exact_rows, table["id"].to_pylist()))
        report.update(edges=edges, kept=n - report["removed"], seconds=round(time.perf_counter() - started, 3))
        atomic_write_json(state.path("dedup", "report.json"), report)
    return report
