"""The faiss index layer against brute-force numpy: plans, exact and approximate search, recall, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinoforge.core.errors import ConfigError, DataError, MissingDependencyError
from dinoforge.core.index import (ArrayVectors, IndexConfig, ShardedVectors, SubsetVectors, VectorIndex,
                                  default_nlist, exact_search, measure_recall, plan_index, recall_at_k, tune_index)


def clustered(n: int, d: int, *, centers: int = 64, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """Gaussian clusters around random directions (the shape real embeddings have), float32 ``[n, d]``."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def brute_force(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k by a full matrix product."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    sims = q @ b.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_plan_follows_size_and_memory() -> None:
    cfg = IndexConfig()
    assert plan_index(1000, 384, cfg).factory == "Flat"
    mid = plan_index(400_000, 384, cfg)
    assert mid.kind == "ivf_flat" and mid.factory == "IVF2048,Flat" and mid.nlist == default_nlist(400_000)
    big = plan_index(1_000_000, 384, cfg)  # above fast_scan_min: 4-bit fast-scan codes + exact re-ranking
    assert big.kind == "ivf_pq_fs" and big.factory == "IVF2048,PQ96x4fs,RFlat"
    assert plan_index(1_000_000, 384, cfg, with_ids=True).kind == "ivf_flat"  # serving: ids and removals
    with pytest.raises(ConfigError, match="explicit ids"):
        plan_index(1_000_000, 384, IndexConfig(kind="ivf_pq_fs"), with_ids=True)
    assert plan_index(1_000_000, 384, cfg.model_copy(update={"memory_budget_gb": 1.0})).factory == "IVF4096,PQ64x8np"
    assert plan_index(10_000_000, 768, cfg).kind == "ivf_pq"
    assert plan_index(5_000, 64, IndexConfig(kind="ivf_flat")).nlist <= 5_000 // 39  # never starved of points
    assert plan_index(10, 8, IndexConfig(kind="hnsw")).factory == "HNSW32,Flat"
    with pytest.raises(ConfigError, match="does not divide"):
        plan_index(10**7, 100, IndexConfig(kind="ivf_pq", pq_m=48))
    with pytest.raises(ValueError):
        IndexConfig(flat_max=10, ivf_max=5)


def test_flat_and_streamed_exact_search_equal_brute_force() -> None:
    base = clustered(3000, 32)
    queries = clustered(50, 32, seed=1)
    ref_s, ref_i = brute_force(queries, base, 10)
    index = VectorIndex.build(ShardedVectors([base[:1000], base[1000:2500], base[2500:]]), IndexConfig())
    assert index.plan.kind == "flat" and index.ntotal == 3000
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    s2, i2 = exact_search(queries, ArrayVectors(base.astype(np.float16).astype(np.float32)), 10, chunk_rows=333)
    np.testing.assert_array_equal(i2, brute_force(queries, base.astype(np.float16).astype(np.float32), 10)[1])
    assert queries.dtype == np.float32 and np.isclose(np.linalg.norm(queries[0]), np.linalg.norm(clustered(
        50, 32, seed=1)[0]))  # the caller's array is not normalised in place


def test_ivf_tuning_reaches_target_and_full_probe_is_exact() -> None:
    base = clustered(20_000, 48, centers=200)
    source = ArrayVectors(base.astype(np.float16))  # float16 storage like the extraction shards
    index = VectorIndex.build(source, IndexConfig(flat_max=1000, tune_queries=300))
    assert index.plan.kind == "ivf_flat" and index.plan.nlist == 512
    report = tune_index(index, source)
    assert report.recall >= 0.95 and report.num_queries == 300
    assert index.last_recall["target"] == 0.95 and index.search_params["nprobe"] < 512
    index.set_search_params(nprobe=512)  # every list probed: exact
    queries = base[:40].astype(np.float16).astype(np.float32)
    _, ids = index.search(queries, 5)
    np.testing.assert_array_equal(ids, brute_force(queries, base.astype(np.float16).astype(np.float32), 5)[1])


def test_ivf_pq_and_hnsw_report_their_recall() -> None:
    base = clustered(4000, 16, centers=60)
    source = ArrayVectors(base)
    pq = VectorIndex.build(source, IndexConfig(kind="ivf_pq", nlist=16, pq_m=2, tune_queries=200))
    report = measure_recall(pq, source)
    assert 0.0 < report.recall < 1.0 and report.params["factory"] == "IVF16,PQ2x8np"
    hnsw = VectorIndex.build(source, IndexConfig(kind="hnsw", hnsw_m=16, tune_queries=200))
    assert tune_index(hnsw, source).recall >= 0.95 and "ef_search" in hnsw.search_params
    with pytest.raises(ConfigError, match="cannot remove"):
        hnsw.remove(np.array([1]))


def test_fast_scan_index_tunes_to_target_and_filters_like_brute_force() -> None:
    base = clustered(20_000, 32, centers=200)
    source = ArrayVectors(base)
    index = VectorIndex.build(source, IndexConfig(flat_max=1000, fast_scan_min=10_000, tune_queries=300))
    assert index.plan.kind == "ivf_pq_fs" and index.plan.factory == "IVF256,PQ8x4fs,RFlat"
    report = tune_index(index, source)
    assert report.recall >= 0.95 and index.search_params["nprobe"] < 256
    index.set_search_params(nprobe=256)  # every list probed: only the 4-bit ranking can differ, re-ranked exactly
    queries = base[:40]
    scores, ids = index.search(queries, 10)
    assert recall_at_k(ids, brute_force(queries, base, 10)[1]) >= 0.95
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, b[ids]), atol=1e-5)  # re-ranked: exact scores
    keep = np.zeros(20_000, bool)
    keep[::3] = True
    _, kept_ids = index.search(queries, 10, allowed=keep)
    assert keep[kept_ids].all()
    with pytest.raises(ConfigError, match="cannot remove"):
        index.remove(np.array([1]))
    shallow = VectorIndex.build(source, IndexConfig(flat_max=1000, fast_scan_min=10_000, tune_queries=300,
                                                    k_factor=2))
    assert tune_index(shallow, source).recall >= 0.95 and shallow.search_params["k_factor"] > 2  # tuning deepens it


def test_recall_counts_ties_as_correct() -> None:
    exact = np.array([[3, 4]])
    assert recall_at_k(np.array([[3, 9]]), exact) == 0.5
    # id 9 duplicates id 4 (same score): a correct answer
    assert recall_at_k(np.array([[3, 9]]), exact, approx_true_scores=np.array([[1.0, 0.8]]),
                       exact_scores=np.array([[1.0, 0.8]])) == 1.0
    assert recall_at_k(np.array([[3, -1]]), np.array([[3, -1]])) == 1.0  # fewer than k results exist


def test_restricted_search_equals_brute_force_on_the_subset() -> None:
    base = clustered(4000, 16, centers=20)
    keep = np.zeros(4000, bool)
    keep[np.random.default_rng(2).choice(4000, 1500, replace=False)] = True
    queries = clustered(30, 16, centers=20, seed=5)
    for cfg in (IndexConfig(), IndexConfig(kind="ivf_flat", nlist=32, nprobe=32)):
        index = VectorIndex.build(ArrayVectors(base), cfg)
        _, ids = index.search(queries, 7, allowed=keep)
        sub = np.nonzero(keep)[0]
        np.testing.assert_array_equal(ids, sub[brute_force(queries, base[sub], 7)[1]])
    with pytest.raises(DataError, match="bool mask"):
        index.search(queries, 3, allowed=keep[:10])


def test_save_load_roundtrip_and_bad_files(tmp_path: Path) -> None:
    base = clustered(5000, 24, centers=30)
    index = VectorIndex.build(ArrayVectors(base), IndexConfig(kind="ivf_flat", nlist=64, nprobe=9))
    measure_recall(index, ArrayVectors(base))
    before = index.search(base[:20], 5)
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx", mmap=True)
    assert loaded.search_params == {"nprobe": 9} and loaded.last_recall == index.last_recall
    for a, b in zip(before, loaded.search(base[:20], 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary leftovers
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="not a saved index"):
        VectorIndex.load(tmp_path / "junk")
    del loaded  # it maps index.faiss: truncating a mapped file in place would be a SIGBUS, so replace it
    (tmp_path / "idx" / "index.faiss").unlink()
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable faiss index"):
        VectorIndex.load(tmp_path / "idx")


def test_explicit_ids_add_and_remove() -> None:
    base = clustered(400, 8, centers=5)
    ids = np.arange(400, dtype=np.int64) * 10 + 7
    for cfg in (IndexConfig(), IndexConfig(kind="ivf_flat", nlist=4, nprobe=4)):
        index = VectorIndex.create(8, 400, cfg, with_ids=True)
        index.train(ArrayVectors(base))
        index.add(base, ids=ids)
        assert index.search(base[3:4], 1)[1][0, 0] == 37
        assert index.remove(np.array([37, 47])) == 2 and index.ntotal == 398
        assert index.search(base[3:4], 1)[1][0, 0] != 37
    plain = VectorIndex.build(ArrayVectors(base), IndexConfig())
    with pytest.raises(DataError, match="no explicit ids"):
        plain.add(base[:2], ids=np.array([1, 2]))


def test_bad_vectors_and_devices_are_clear_errors() -> None:
    index = VectorIndex.build(ArrayVectors(clustered(100, 8)), IndexConfig())
    with pytest.raises(DataError, match=r"must be \[n, 8\]"):
        index.search(np.zeros((2, 9), np.float32), 1)
    bad = np.ones((2, 8), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        index.add(bad)
    with pytest.raises(ConfigError, match="k must be"):
        index.search(bad[:1], 0)
    with pytest.raises(MissingDependencyError, match="faiss-gpu"):
        VectorIndex.create(8, 100, IndexConfig(device="cuda"))
    assert VectorIndex.create(8, 100, IndexConfig(device="auto")).device == "cpu"  # no GPU faiss here
    small = VectorIndex.build(ArrayVectors(clustered(100, 8)), IndexConfig(kind="ivf_flat", nlist=64))
    assert small.plan.nlist == 2  # clamped: 100 vectors cannot train 64 cells (faiss needs 39 points each)


def test_vector_views_read_the_right_rows() -> None:
    base = clustered(1000, 6)
    sharded = ShardedVectors([base[:300], base[300:301], base[301:]])
    rows = np.array([999, 0, 300, 301, 5])
    np.testing.assert_array_equal(sharded.take(rows), base[rows])
    np.testing.assert_array_equal(np.concatenate([c for _, c in sharded.iter_chunks(128)]), base)
    sub = SubsetVectors(sharded, np.array([2, 299, 300, 700, 999]))
    np.testing.assert_array_equal(np.concatenate([c for _, c in sub.iter_chunks(100)]), base[[2, 299, 300, 700, 999]])
    np.testing.assert_array_equal(sub.take(np.array([4, 0])), base[[999, 2]])
    with pytest.raises(DataError, match="sorted"):
        SubsetVectors(sharded, np.array([5, 3]))
    with pytest.raises(DataError, match="different widths"):
        ShardedVectors([base[:, :3], base])
