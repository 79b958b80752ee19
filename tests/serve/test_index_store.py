"""The retrieval store: search equals brute force, upserts/deletes, crash-consistent persistence."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from dinoforge.core.errors import ConfigError
from dinoforge.serve import index_store
from dinoforge.serve.index_store import IndexStore


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _open(root: Path, dim: int = 24) -> IndexStore:
    return IndexStore(root, dim=dim, pooling="cls", model_sha256="abc")


def test_search_equals_brute_force_with_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = _open(tmp_path)
    vectors = _unit(rng, 500, 24)
    ids = [f"v{i}" for i in range(500)]
    names, replaced = store.upsert(ids, vectors, [{"i": i, "tags": ["x"]} for i in range(500)])
    assert names == ids and replaced == 0 and store.count == 500
    queries = _unit(rng, 20, 24)
    hits = store.search(queries, 7)
    sims = queries @ vectors.T  # [20, 500]
    for q, row in enumerate(hits):
        want = np.argsort(-sims[q])[:7]
        assert [h[0] for h in row] == [f"v{i}" for i in want]
        np.testing.assert_allclose([h[1] for h in row], sims[q, want], atol=1e-5)
        assert row[0][2] == {"i": int(want[0]), "tags": ["x"]}


def test_upsert_replaces_and_delete_removes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = _open(tmp_path, dim=8)
    v = _unit(rng, 4, 8)
    store.upsert(["a", "b", "c", None], v, [{"n": i} for i in range(4)])
    assert store.count == 4
    new = _unit(rng, 1, 8)
    _, replaced = store.upsert(["b"], new, [{"n": "new"}])
    assert replaced == 1 and store.count == 4
    top = store.search(new, 1)[0][0]
    assert top[0] == "b" and top[1] == pytest.approx(1.0, abs=1e-5) and top[2] == {"n": "new"}
    _, replaced = store.upsert(["d", "d"], _unit(rng, 2, 8), [{"k": 1}, {"k": 2}])  # duplicate in one call
    assert replaced == 0 and store.count == 5 and store.search(np.ones((1, 8), np.float32), 10)[0]
    assert store.delete("a") and not store.delete("a") and store.count == 4
    assert all(h[0] != "a" for h in store.search(v[:1], 10)[0])
    assert len(store.search(v[:1], 100)[0]) == 4  # k above the count returns what there is
    with pytest.raises(ValueError):
        store.upsert(["x"], _unit(rng, 1, 9), [{}])


def test_reopen_uses_snapshot_and_rebuilds_when_stale_or_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = _open(tmp_path)
    vectors = _unit(rng, 50, 24)
    store.upsert([str(i) for i in range(50)], vectors, [{}] * 50)
    expected = store.search(vectors[:3], 5)
    store.close()
    assert json.loads((tmp_path / "index.json").read_text())["count"] == 50
    assert _open(tmp_path).search(vectors[:3], 5) == expected
    # a crash between the SQLite commit and the snapshot: the snapshot names an older generation
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["generation"] -= 1
    (tmp_path / "index.json").write_text(json.dumps(meta))
    reopened = _open(tmp_path)
    assert reopened.count == 50 and reopened.search(vectors[:3], 5) == expected
    reopened.close()
    (tmp_path / "index.faiss").write_bytes(b"torn write")
    assert _open(tmp_path).search(vectors[:3], 5) == expected


def test_large_indexes_defer_snapshots_to_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_store, "EAGER_SNAPSHOT_BYTES", 0)
    rng = np.random.default_rng(3)
    store = _open(tmp_path)
    store.upsert(["a"], _unit(rng, 1, 24), [{}])
    snapshot = tmp_path / "index.json"
    assert json.loads(snapshot.read_text())["count"] == 0  # SQLite has it; the snapshot waits
    store.close()
    assert json.loads(snapshot.read_text())["count"] == 1 and _open(tmp_path).count == 1


def test_failed_write_leaves_the_store_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = _open(tmp_path, dim=4)
    store.upsert(["a"], _unit(rng, 1, 4), [{}])
    gen = store.generation
    with pytest.raises(TypeError):  # metadata that is not JSON serialisable fails inside the transaction
        store.upsert(["b", "c"], _unit(rng, 2, 4), [{}, {"x": object()}])
    assert store.count == 1 and store.generation == gen
    assert [h[0] for h in store.search(np.ones((1, 4), np.float32), 5)[0]] == ["a"]


def test_binding_mismatch_is_refused(tmp_path: Path) -> None:
    _open(tmp_path).close()
    with pytest.raises(ConfigError, match="dim=24"):
        IndexStore(tmp_path, dim=32, pooling="cls", model_sha256="abc")
    with pytest.raises(ConfigError, match="model_sha256"):
        IndexStore(tmp_path, dim=24, pooling="cls", model_sha256="other")
    with sqlite3.connect(tmp_path / "meta.sqlite") as db:
        assert dict(db.execute("SELECT key, value FROM config"))["pooling"] == "cls"


def test_large_index_goes_through_core_index_and_stays_usable(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    centers = _unit(rng, 40, 24)
    points = centers[rng.integers(0, 40, 4000)] + 0.15 * rng.standard_normal((4000, 24)).astype(np.float32)
    vectors = points / np.linalg.norm(points, axis=1, keepdims=True)
    store = IndexStore(tmp_path, dim=24, pooling="cls", model_sha256="abc", exact_limit=500)
    store.upsert([f"p{i}" for i in range(4000)], vectors, [{}] * 4000)
    store.close()
    big = IndexStore(tmp_path, dim=24, pooling="cls", model_sha256="abc", exact_limit=500)  # rebuilt on open
    assert big.info()["kind"].startswith("core.index IVF")
    queries = vectors[:200]
    hits = big.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len({h[0] for h in row} & {f"p{i}" for i in want}) / 10
                      for row, want in zip(hits, exact, strict=True)])
    assert recall >= 0.9, recall
    assert big.delete("p0") and all(h[0] != "p0" for h in big.search(vectors[:1], 10)[0])
    big.upsert(["new"], vectors[1:2], [{"n": 1}])
    before = big.search(vectors[1:2], 5)
    assert "new" in {h[0] for h in before[0]}
    big.close()
    again = IndexStore(tmp_path, dim=24, pooling="cls", model_sha256="abc", exact_limit=500)
    assert again.count == 4000 and again.info()["kind"].startswith("core.index")  # snapshot reloaded
    assert again.search(vectors[1:2], 5) == before
