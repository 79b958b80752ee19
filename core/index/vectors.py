"""Row-addressable vector collections that the index layer reads without loading them whole.

An index is fed from a :class:`VectorSource`: something that knows its shape, yields row chunks in order
and can fetch arbitrary rows (for training samples and recall checks). Two implementations cover every
case in dinoforge:

* :class:`ArrayVectors`: one array-like (an ``np.ndarray`` or an ``np.memmap``);
* :class:`ShardedVectors`: a list of array-likes, one per shard, addressed by a global row number —
  the extraction store (:mod:`dinoforge.core.extract`) hands its float16 ``.npy`` shards over as memmaps.

Chunks are converted to contiguous float32 one at a time, so peak memory is one chunk, not the collection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from dinoforge.core.errors import DataError


@runtime_checkable
class VectorSource(Protocol):
    """A ``[num_rows, dim]`` collection read in chunks."""

    @property
    def num_rows(self) -> int:
        """Number of vectors."""
        ...

    @property
    def dim(self) -> int:
        """Vector width."""
        ...

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, float32 [m, dim])`` chunks covering every row in order."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Return float32 ``[len(rows), dim]`` for the given global row numbers (any order)."""
        ...


def as_float32(chunk: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy-or-view of ``chunk`` (float16 shards become float32 here)."""
    return np.ascontiguousarray(chunk, dtype=np.float32)


def _check_2d(array: np.ndarray, what: str) -> None:
    if array.ndim != 2:
        raise DataError(f"{what} must be a 2-D [rows, dim] array, got shape {tuple(array.shape)}")


class ArrayVectors:
    """A single in-memory or memory-mapped ``[n, d]`` array as a :class:`VectorSource`."""

    def __init__(self, array: np.ndarray) -> None:
        _check_2d(array, "vectors")
        self.array = array

    @property
    def num_rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.num_rows, max(1, chunk_rows)):
            yield start, as_float32(self.array[start:start + chunk_rows])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise DataError(f"row numbers out of range [0, {self.num_rows})")
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on a memmap
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        out[order] = self.array[rows[order]]
        return out


class ShardedVectors:
    """Several ``[n_i, d]`` arrays (e.g. one memmap per shard) seen as one ``[sum n_i, d]`` collection.

    Args:
        shards: array-likes with the same width, in global row order.
    """

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        if not shards:
            raise DataError("a sharded vector collection needs at least one shard")
        for i, shard in enumerate(shards):
            _check_2d(shard, f"shard {i}")
        dims = {int(s.shape[1]) for s in shards}
        if len(dims) != 1:
            raise DataError(f"shards have different widths {sorted(dims)}")
        self.shards = list(shards)
        sizes = np.array([s.shape[0] for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # [n_shards + 1]

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1])

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        step = max(1, chunk_rows)
        for offset, shard in zip(self.offsets[:-1], self.shards, strict=True):
            for start in range(0, shard.shape[0], step):
                yield int(offset) + start, as_float32(shard[start:start + step])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise DataError(f"row numbers out of range [0, {self.num_rows})")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1  # [len(rows)]
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.shards[s][local[order]]
        return out


class SubsetVectors:
    """Selected rows of another source, renumbered ``0..len(rows)-1`` in the given (sorted) order.

    Args:
        base: the full collection.
        rows: sorted distinct int64 row numbers of ``base``; position ``i`` of the subset is ``base`` row
            ``rows[i]`` (``rows`` maps index ids back to collection rows).
    """

    def __init__(self, base: VectorSource, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size > 1 and np.any(np.diff(rows) <= 0)):
            raise DataError("subset rows must be a sorted 1-D array of distinct row numbers")
        if rows.size and (rows[0] < 0 or rows[-1] >= base.num_rows):
            raise DataError(f"subset rows out of range [0, {base.num_rows})")
        self.base, self.rows = base, rows

    @property
    def num_rows(self) -> int:
        return int(self.rows.size)

    @property
    def dim(self) -> int:
        return self.base.dim

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        done = 0
        for start, chunk in self.base.iter_chunks(chunk_rows):
            lo, hi = np.searchsorted(self.rows, [start, start + chunk.shape[0]])
            if hi > lo:
                yield done, np.ascontiguousarray(chunk[self.rows[lo:hi] - start])
                done += int(hi - lo)

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise DataError(f"row numbers out of range [0, {self.num_rows})")
        return self.base.take(self.rows[rows])


def sample_rows(num_rows: int, size: int, seed: int) -> np.ndarray:
    """Sorted distinct row numbers: all rows when ``size >= num_rows``, else a seeded uniform sample."""
    if size >= num_rows:
        return np.arange(num_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=size, replace=False)).astype(np.int64)


def l2_normalize(x: np.ndarray, *, inplace: bool = False, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm; zero rows stay zero.

    Args:
        x: ``[n, d]`` array (any float dtype).
        inplace: normalise ``x`` itself when it is a writable contiguous float32 array (else a copy).

    Returns:
        float32 ``[n, d]``.
    """
    reuse = inplace and x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous
    x = x if reuse else np.array(x, dtype=np.float32, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    np.divide(x, np.maximum(norms, eps), out=x)
    return x


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise :class:`DataError` when ``x`` holds NaN or infinity (faiss would silently mis-rank them)."""
    if not np.isfinite(x).all():
        raise DataError(f"{what} contain NaN or infinite values")
