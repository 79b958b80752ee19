"""The two vector indexes behind :class:`~dinoforge.serve.index_store.IndexStore`.

* :class:`FlatIndex`: exact inner-product search (``IndexIDMap2(IndexFlatIP)``), for small indexes.
* :class:`ApproxIndex`: the :mod:`dinoforge.core.index` layer (size-based IVF-Flat / IVF-PQ choice, trained on
  the stored vectors), for indexes above the store's ``exact_limit``.

Both take int64 ids (the SQLite keys), search L2-normalised float32 vectors and save atomically.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from dinoforge.core.fileio import atomic_write_bytes
from dinoforge.core.index import ArrayVectors, IndexConfig, VectorIndex

FLAT_FILE, APPROX_DIR = "index.faiss", "approx"


class FlatIndex:
    """Exact cosine search over explicit ids."""

    kind = "flat-ip"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add ``x [n, d]`` under ``ids [n]``."""
        self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``scores [q, k]`` and ``ids [q, k]`` (-1 past the end), best first."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def save(self, root: Path) -> None:
        atomic_write_bytes(root / FLAT_FILE, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, root: Path) -> FlatIndex:
        index = faiss.deserialize_index(np.fromfile(root / FLAT_FILE, dtype=np.uint8))
        return cls(int(index.d), index)


class ApproxIndex:
    """Approximate cosine search through :class:`dinoforge.core.index.VectorIndex`."""

    kind = "core.index"

    def __init__(self, index: VectorIndex) -> None:
        self.vi = index

    @classmethod
    def build(cls, keys: np.ndarray, vectors: np.ndarray, exact_limit: int) -> ApproxIndex:
        """Plan for ``len(vectors)`` rows (exact up to ``exact_limit``), train on them and add them."""
        config = IndexConfig(flat_max=min(exact_limit, IndexConfig().ivf_max))
        vi = VectorIndex.create(vectors.shape[1], len(vectors), config, with_ids=True)
        vi.train(ArrayVectors(vectors))
        for start in range(0, len(vectors), config.chunk_rows):
            vi.add(vectors[start:start + config.chunk_rows], keys[start:start + config.chunk_rows])
        return cls(vi)

    @property
    def ntotal(self) -> int:
        return self.vi.ntotal

    @property
    def dim(self) -> int:
        return self.vi.dim

    @property
    def factory(self) -> str:
        return self.vi.plan.factory

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.vi.add(x, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.vi.remove(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.vi.search(queries, k)

    def save(self, root: Path) -> None:
        self.vi.save(root / APPROX_DIR, overwrite=True)

    @classmethod
    def load(cls, root: Path) -> ApproxIndex:
        return cls(VectorIndex.load(root / APPROX_DIR))


def load_index(root: Path, kind: str) -> FlatIndex | ApproxIndex:
    """Load the snapshot of ``kind`` written by ``save``."""
    return ApproxIndex.load(root) if kind == ApproxIndex.kind else FlatIndex.load(root)
