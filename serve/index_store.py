"""The retrieval index behind ``/v1/index`` and ``/v1/search``: faiss vectors + SQLite ids and metadata.

Durability: SQLite is the source of truth (ids, JSON metadata and the float32 vectors, one transaction per
request, so an acknowledged write survives a crash). The faiss index is a snapshot of it, written atomically
(``index.faiss`` then ``index.json`` naming the SQLite generation it reflects). On start the snapshot is used
when its generation matches, and rebuilt from SQLite otherwise (a crash between the two writes, or a snapshot
skipped because the index is large), so the two can never disagree.

Search is exact (inner product on L2-normalised vectors = cosine) up to ``exact_limit`` vectors; an index
(re)built with more (at start-up, from SQLite) goes through :mod:`dinoforge.core.index`, which picks an
approximate index by size (IVF-Flat, IVF-PQ). Between restarts new vectors join the index in use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dinoforge.core.errors import ConfigError, DinoforgeError
from dinoforge.core.fileio import atomic_write_json
from dinoforge.core.pooling import Pooling
from dinoforge.serve.index_kinds import ApproxIndex, FlatIndex, load_index

log = logging.getLogger("dinoforge.serve.index")
DB_FILE, SNAPSHOT_META = "meta.sqlite", "index.json"
#: snapshots bigger than this are written on close only (SQLite already holds every vector)
EAGER_SNAPSHOT_BYTES = 16 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
"""


class IndexStore:
    """A persistent id -> (vector, metadata) store with nearest-neighbour search.

    Args:
        root: folder of the index (created if missing).
        dim: vector width.
        pooling: pooling the vectors were made with (checked on reopen).
        model_sha256: weights hash of the model that made them (checked on reopen).
        exact_limit: above this many vectors, search goes through ``core.index`` (approximate).
    """

    def __init__(self, root: str | Path, *, dim: int, pooling: Pooling, model_sha256: str,
                 exact_limit: int = 200_000) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dim, self.pooling, self.model_sha256, self.exact_limit = dim, pooling, model_sha256, exact_limit
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / DB_FILE, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._check_config()
        self._count = int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])  # kept up to date below
        self._index = self._load_snapshot() or self._rebuild()
        self._dirty = False

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM config").fetchall())

    def _check_config(self) -> None:
        want = {"dim": str(self.dim), "pooling": self.pooling, "model_sha256": self.model_sha256}
        have = self._config()
        if not have:
            with self._tx():
                self._db.executemany("INSERT INTO config VALUES (?, ?)", [*want.items(), ("generation", "0")])
            return
        for key, value in want.items():
            if have.get(key) != value:
                raise ConfigError(f"index {self.root} was built with {key}={have.get(key)}, but this server "
                                  f"has {key}={value}; use another --index-dir or the original model")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Commit on success, roll back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def generation(self) -> int:
        """Counter bumped by every committed change."""
        return int(self._config()["generation"])

    def _load_snapshot(self) -> FlatIndex | ApproxIndex | None:
        meta_path = self.root / SNAPSHOT_META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            index = load_index(self.root, meta.get("kind", FlatIndex.kind))
        except (OSError, ValueError, RuntimeError, DinoforgeError) as err:
            log.warning("index snapshot in %s unreadable (%s); rebuilding from SQLite", self.root, err)
            return None
        if meta.get("generation") != self.generation or index.ntotal != self.count or index.dim != self.dim:
            log.info("index snapshot is stale (generation %s, SQLite %s); rebuilding", meta.get("generation"),
                     self.generation)
            return None
        if isinstance(index, ApproxIndex) != (self.count > self.exact_limit):
            return None  # grown past (or shrunk below) exact_limit since it was built: re-plan
        return index

    def _read_all(self, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        keys, vecs = [], []
        cursor = self._db.execute("SELECT key, vector FROM items ORDER BY key")
        while rows := cursor.fetchmany(chunk):
            keys.append(np.array([r[0] for r in rows], dtype=np.int64))
            vecs.append(np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1))
        if not keys:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(keys), np.concatenate(vecs)  # [n], [n, dim]

    def _rebuild(self) -> FlatIndex | ApproxIndex:
        """A fresh index from SQLite: exact up to ``exact_limit`` vectors, ``core.index`` above."""
        keys, vectors = self._read_all()
        if len(keys) > self.exact_limit:
            index: FlatIndex | ApproxIndex = ApproxIndex.build(keys, vectors, self.exact_limit)
            log.info("index of %d vectors: %s (core.index)", len(keys), index.factory)
        else:
            index = FlatIndex(self.dim)
            if len(keys):
                index.add(vectors, keys)
        self._index = index
        self._write_snapshot()
        return index

    def _write_snapshot(self) -> None:
        self._index.save(self.root)
        meta = {"generation": self.generation, "count": self.count, "dim": self.dim, "kind": self._index.kind}
        atomic_write_json(self.root / SNAPSHOT_META, meta)  # written last: it vouches for the snapshot
        self._dirty = False

    def _after_change(self) -> None:
        if self.count * self.dim * 4 <= EAGER_SNAPSHOT_BYTES:
            self._write_snapshot()
        else:
            self._dirty = True

    def flush(self) -> None:
        """Write the faiss snapshot now if it lags behind SQLite."""
        with self._lock:
            if self._dirty:
                self._write_snapshot()

    def close(self) -> None:
        """Flush and close the database."""
        with self._lock:
            self.flush()
            self._db.close()

    # ------------------------------------------------------------------ operations
    @property
    def count(self) -> int:
        """Number of stored vectors."""
        return self._count

    def upsert(self, ids: list[str | None], vectors: np.ndarray,
               metadata: list[dict[str, Any]]) -> tuple[list[str], int]:
        """Add vectors; an existing id is replaced (vector and metadata).

        Args:
            ids: one per vector; ``None`` gets a fresh UUID.
            vectors: float32 ``[n, dim]``, L2-normalised.
            metadata: one JSON object per vector.

        Returns:
            The ids in order and how many distinct ids replaced an existing entry.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or not (len(ids) == len(vectors) == len(metadata)):
            raise ValueError(f"expected [n, {self.dim}] vectors with n ids and n metadata objects")
        names = [i if i is not None else uuid.uuid4().hex for i in ids]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            existing = self._keys(names)
            before = set(existing)
            with self._tx():
                keys = []
                for name, vec, meta in zip(names, vectors, metadata, strict=True):
                    blob, text = vec.tobytes(), json.dumps(meta)
                    if name in existing:
                        self._db.execute("UPDATE items SET metadata=?, vector=? WHERE id=?", (text, blob, name))
                        keys.append(existing[name])
                    else:
                        cur = self._db.execute("INSERT INTO items (id, metadata, vector) VALUES (?, ?, ?)",
                                               (name, text, blob))
                        keys.append(int(cur.lastrowid))
                        existing[name] = keys[-1]
                self._bump()
            self._count += len(set(names) - before)
            key_arr = np.array(keys, dtype=np.int64)
            self._index.remove(key_arr)  # replaced ids (and in-request duplicates) leave first
            last = {k: i for i, k in enumerate(keys)}  # a duplicated id keeps its last vector
            rows = sorted(last.values())
            self._index.add(vectors[rows], key_arr[rows])
            self._after_change()
        return names, len(set(names) & before)

    def _keys(self, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for start in range(0, len(names), 500):
            part = names[start:start + 500]
            marks = ",".join("?" * len(part))
            out.update(self._db.execute(f"SELECT id, key FROM items WHERE id IN ({marks})", part).fetchall())
        return out

    def _bump(self) -> None:
        self._db.execute("UPDATE config SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def delete(self, name: str) -> bool:
        """Remove one id; returns ``False`` when it is not in the index."""
        with self._lock:
            row = self._db.execute("SELECT key FROM items WHERE id=?", (name,)).fetchone()
            if row is None:
                return False
            with self._tx():
                self._db.execute("DELETE FROM items WHERE key=?", (row[0],))
                self._bump()
            self._count -= 1
            self._index.remove(np.array([row[0]], dtype=np.int64))
            self._after_change()
            return True

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float, dict[str, Any]]]]:
        """Top-``k`` ``(id, cosine, metadata)`` per query row of ``queries [q, dim]``, best first."""
        with self._lock:
            if self.count == 0:
                return [[] for _ in range(len(queries))]
            scores, keys = self._index.search(queries, k)  # [q, k]
            found = {int(x) for x in keys.ravel() if x >= 0}
            rows = self._rows(sorted(found))
        return [[(rows[int(key)][0], float(s), rows[int(key)][1]) for s, key in zip(srow, krow, strict=True)
                 if key >= 0] for srow, krow in zip(scores, keys, strict=True)]

    def _rows(self, keys: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        out: dict[int, tuple[str, dict[str, Any]]] = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for key, name, meta in self._db.execute(f"SELECT key, id, metadata FROM items WHERE key IN ({marks})",
                                                    part):
                out[key] = (name, json.loads(meta))
        return out

    def info(self) -> dict[str, Any]:
        """Size and binding of the index (``GET /v1/index``)."""
        kind = self._index.kind if isinstance(self._index, FlatIndex) else f"core.index {self._index.factory}"
        return {"count": self.count, "dim": self.dim, "kind": kind, "pooling": self.pooling,
                "model_sha256": self.model_sha256}

