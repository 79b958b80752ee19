"""Index building and sharded searching shared by the deduplication and retrieval steps.

Structure for large pools (and ``torchrun``):

* rank 0 builds the index (plan by size, train on a sample, add the pool chunk by chunk), tunes its search
  breadth to the recall target, and saves it; the other ranks wait and load it;
* the queries are cut into fixed chunks; chunk ``c`` is searched by rank ``c % world_size`` and its result
  (only what the step keeps, e.g. edges above a threshold) is written atomically to its own file, so a
  killed run resumes chunk by chunk;
* rank 0 then reads the small chunk files back.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinoforge.core.fileio import atomic_write_bytes, atomic_write_json
from dinoforge.core.index import IndexConfig, VectorIndex, VectorSource, tune_index
from dinoforge.core.runtime import Runtime, barrier

log = logging.getLogger("dinoforge.curate")
Keep = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass
class PoolIndex:
    """An index over some pool rows: index id ``i`` is pool row ``rows[i]``."""

    index: VectorIndex
    rows: np.ndarray  # int64 [ntotal], sorted

    def allowed(self, keep_rows: np.ndarray) -> np.ndarray:
        """Bool ``[ntotal]`` mask of the index ids whose pool row is in ``keep_rows`` (sorted int64)."""
        pos = np.searchsorted(keep_rows, self.rows)
        pos = np.minimum(pos, max(keep_rows.size - 1, 0))
        return keep_rows[pos] == self.rows if keep_rows.size else np.zeros(self.rows.size, bool)


def build_or_load(path: Path, source: VectorSource, rows: np.ndarray, cfg: IndexConfig, info: Runtime, *,
                  tune_queries: np.ndarray | None = None) -> tuple[PoolIndex, dict[str, object]]:
    """The saved index at ``path``, building (rank 0) and tuning it first when it is not there yet.

    Args:
        path: index directory (``VectorIndex.save`` layout); ``<path>.rows.npy`` beside it maps ids to rows.
        source: the vectors indexed (row ``i`` of ``source`` is pool row ``rows[i]``).
        rows: int64 pool rows of ``source``'s rows.
        cfg: index settings.
        info: ranks.
        tune_queries: queries for tuning and the recall report (default: samples of ``source``).

    Returns:
        The index and a report (plan, recall@10, build seconds).
    """
    rows_file = path.parent / f"{path.name}.rows.npy"
    info_file = path.parent / f"{path.name}.build.json"
    if info.is_main and not (path / "index.json").is_file():
        start = time.perf_counter()
        index = VectorIndex.build(source, cfg)
        built = time.perf_counter() - start
        recall = tune_index(index, source, queries=tune_queries)
        log.info("index %s over %d vectors: recall@10 %.4f with %s", index.plan.factory, index.ntotal,
                 recall.recall, index.search_params)
        _write_npy(rows_file, np.asarray(rows, dtype=np.int64))
        atomic_write_json(info_file, {"build_seconds": round(built, 3),
                                      "tune_seconds": round(time.perf_counter() - start - built, 3)})
        index.save(path)  # last: a saved index means rows and build info are there too
    barrier(info)
    index = VectorIndex.load(path)
    report = {"plan": index.plan.to_dict(), "search_params": index.search_params, "recall": index.last_recall,
              "ntotal": index.ntotal, **json.loads(info_file.read_text())}
    return PoolIndex(index, np.load(rows_file)), report


def _write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def sharded_search(index: PoolIndex, queries: VectorSource, k: int, out_dir: Path, info: Runtime, *,
                   chunk_rows: int, keep: Keep, allowed: np.ndarray | None = None) -> list[Path]:
    """Search every query row, writing what ``keep`` returns per chunk to ``out_dir/chunk-XXXXX.npz``.

    Args:
        index: the searched index.
        queries: query vectors (row numbers are query positions).
        k: neighbours per query.
        out_dir: where chunk files go (existing ones are not searched again).
        info: ranks (chunk ``c`` belongs to rank ``c % world_size``).
        chunk_rows: queries per chunk.
        keep: ``keep(query_rows [m], scores [m, k], pool_rows [m, k]) -> {name: array}``; pool rows are -1
            where fewer than k results exist.
        allowed: optional bool mask over index ids (restricted search).

    Returns:
        All chunk files (after every rank finished).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-queries.num_rows // chunk_rows)
    for c in range(info.rank, n_chunks, info.world_size):
        path = out_dir / f"chunk-{c:05d}.npz"
        if path.is_file():
            continue
        q_rows = np.arange(c * chunk_rows, min((c + 1) * chunk_rows, queries.num_rows), dtype=np.int64)
        scores, ids = index.index.search(queries.take(q_rows), k, allowed=allowed)  # [m, k]
        pool_rows = np.where(ids >= 0, index.rows[np.maximum(ids, 0)], -1)
        _write_npz(path, keep(q_rows, scores, pool_rows))
        log.debug("search chunk %d/%d done", c + 1, n_chunks)
    barrier(info)
    return [out_dir / f"chunk-{c:05d}.npz" for c in range(n_chunks)]


def read_chunks(paths: list[Path]) -> dict[str, np.ndarray]:
    """Concatenate the arrays of chunk files (same keys in each)."""
    parts: dict[str, list[np.ndarray]] = {}
    for path in paths:
        with np.load(path) as data:
            for key in data.files:
                parts.setdefault(key, []).append(data[key])
    return {k: np.concatenate(v) for k, v in parts.items()}
