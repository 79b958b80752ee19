"""Step 4 — retrieval of pool images that look like the curated seed sets.

Only candidates are retrieved: pool images kept by both deduplication steps.

* **Sample-based**: the ``k`` nearest candidates of every seed image (cosine, through the index layer; the
  self-deduplication index is reused with a candidate filter when it holds the same embeddings).
* **Cluster-based**: spherical k-means of the candidates; every seed is assigned to its nearest centroid;
  a cluster holding at least ``min_seed_hits`` seeds of a set gives that set up to ``per_cluster`` of its
  images (random or nearest to the centroid); ``max_per_seed_set`` caps a set's total, shared equally among
  its clusters (water filling).

Outputs (``retrieval/``): ``sample.parquet`` (seed set, seed row and id, pool row, rank, similarity),
``cluster.parquet`` (seed set, cluster, pool row, similarity to the centroid, seed hits), ``centroids.npy``,
``report.json``. Report: retrieved (events), unique images, collision rate ``1 - unique / retrieved``, caps hit.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open
from dinoforge.core.index import SubsetVectors
from dinoforge.curate.balance import water_fill
from dinoforge.curate.config import ClusterRetrievalConfig
from dinoforge.curate.kmeans import assign, train_centroids
from dinoforge.curate.search import PoolIndex, read_chunks, sharded_search
from dinoforge.curate.state import RunState


class _Neighbours:
    def __call__(self, q: np.ndarray, scores: np.ndarray, pool_rows: np.ndarray) -> dict[str, np.ndarray]:
        k = pool_rows.shape[1]
        ok = pool_rows >= 0
        return {"seed_row": np.repeat(q, k).reshape(-1, k)[ok], "pool_row": pool_rows[ok],
                "rank": np.broadcast_to(np.arange(k), pool_rows.shape)[ok],
                "similarity": scores[ok].astype(np.float32)}


def _write(state: RunState, name: str, table: pa.Table) -> None:
    with atomic_open(state.path("retrieval", name)) as handle:
        pq.write_table(table, handle)


def stats(pool_rows: np.ndarray) -> dict[str, float]:
    """Retrieved events, unique images and collision rate of a list of retrieved pool rows."""
    unique = int(np.unique(pool_rows).size)
    return {"retrieved": int(pool_rows.size), "unique": unique,
            "collision_rate": 1.0 - unique / pool_rows.size if pool_rows.size else 0.0}


def sample_retrieval(state: RunState, index: PoolIndex, seeds: dict[str, FeatureStore], feature: str,
                     allowed: np.ndarray | None, k: int, chunk_rows: int) -> dict[str, Any]:
    """The k nearest candidates of every seed of every set; writes ``sample.parquet``."""
    tables, report = [], {}
    for name, store in seeds.items():
        chunks = sharded_search(index, store.vectors(feature), k, state.root / "retrieval" / f"sample-{name}",
                                state.info, chunk_rows=chunk_rows, keep=_Neighbours(), allowed=allowed)
        if not state.info.is_main:
            continue
        hits = read_chunks(chunks)
        ids = store.table(["id"])["id"].to_pylist()
        seed_rows = hits.get("seed_row", np.zeros(0, np.int64))
        tables.append(pa.table({"seed_set": [name] * seed_rows.size, "seed_row": seed_rows,
                                "seed_id": [ids[i] for i in seed_rows],
                                "pool_row": hits.get("pool_row", np.zeros(0, np.int64)),
                                "rank": hits.get("rank", np.zeros(0, np.int64)),
                                "similarity": hits.get("similarity", np.zeros(0, np.float32))}))
        report[name] = {"seeds": store.num_rows, **stats(tables[-1]["pool_row"].to_numpy())}
    if state.info.is_main:
        table = pa.concat_tables(tables) if tables else pa.table({"seed_set": pa.array([], pa.string())})
        _write(state, "sample.parquet", table)
    return report


def _take(members: np.ndarray, sims: np.ndarray, n: int, pick: str, rng: np.random.Generator) -> np.ndarray:
    if n >= members.size:
        return np.arange(members.size)
    if pick == "nearest":
        return np.argsort(-sims[members], kind="stable")[:n]
    return rng.choice(members.size, size=n, replace=False)


def cluster_retrieval(state: RunState, pool: FeatureStore, seeds: dict[str, FeatureStore], feature: str,
                      candidates: np.ndarray, cfg: ClusterRetrievalConfig, seed: int) -> dict[str, Any]:
    """k-means of the candidates and retrieval from clusters with enough seed hits; writes ``cluster.parquet``."""
    started = time.perf_counter()
    source = SubsetVectors(pool.vectors(feature), candidates)
    centroids = train_centroids(source, min(cfg.num_clusters, source.num_rows), niter=cfg.niter, seed=seed)
    labels, sims = assign(source, centroids)  # per candidate
    np.save(state.path("retrieval", "centroids.npy"), centroids)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(centroids.shape[0] + 1))
    rng = np.random.default_rng(seed)
    tables, report = [], {"num_clusters": int(centroids.shape[0]), "kmeans_seconds": 0.0}
    for name, store in seeds.items():
        seed_labels, _ = assign(store.vectors(feature), centroids)
        hits = np.bincount(seed_labels, minlength=centroids.shape[0])
        used = np.nonzero(hits >= cfg.min_seed_hits)[0]
        sizes = bounds[used + 1] - bounds[used]
        quotas = np.minimum(sizes, cfg.per_cluster)
        capped = cfg.max_per_seed_set is not None and int(quotas.sum()) > cfg.max_per_seed_set
        if capped:
            quotas = water_fill(quotas, int(cfg.max_per_seed_set))
        rows, cl, sim = [], [], []
        for c, q in zip(used, quotas, strict=True):
            members = order[bounds[c]:bounds[c + 1]]  # candidate positions in cluster c
            chosen = members[_take(members, sims, int(q), cfg.pick, rng)]
            rows.append(candidates[chosen])
            cl.append(np.full(chosen.size, c))
            sim.append(sims[chosen])
        pool_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        tables.append(pa.table({"seed_set": [name] * pool_rows.size, "cluster": np.concatenate(cl) if cl else
                                np.zeros(0, np.int64), "pool_row": pool_rows,
                                "similarity": np.concatenate(sim) if sim else np.zeros(0, np.float32),
                                "seed_hits": hits[np.concatenate(cl)] if cl else np.zeros(0, np.int64)}))
        report[name] = {"clusters_used": int(used.size), "cap_hit": bool(capped), **stats(pool_rows)}
    if state.info.is_main:
        _write(state, "cluster.parquet", pa.concat_tables(tables) if tables else
               pa.table({"seed_set": pa.array([], pa.string())}))
    report["kmeans_seconds"] = round(time.perf_counter() - started, 3)
    return report
