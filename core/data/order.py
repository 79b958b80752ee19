"""A deterministic global sample order over an endless stream of epochs, with O(block) memory per process.

Epoch ``e`` of a source of ``n`` rows is a permutation seeded by ``(key, e)``. A full ``numpy`` permutation costs
8 bytes a row (1.1 GB at 142M rows, in every process), so large sources are cut into contiguous *blocks* of
``block_size`` rows: the epoch visits the blocks in a seeded order and each block in its own seeded order,
computed only when a position inside it is asked for (8 bytes x ``block_size``, one or two blocks cached).
A source of at most ``block_size`` rows is one block: its order is a plain permutation of all rows.

Stream position ``p`` (samples consumed over all ranks since epoch 0) is the whole state: ``p`` names the
epoch and the row, so a run resumed at ``p`` reads the same rows whatever its world size. A rank takes
positions ``start + rank, start + rank + world_size, ...`` (:meth:`EpochOrder.rank_indices`, :class:`RankSampler`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

#: Rows per block: 8 MB of int64 order per cached block.
DEFAULT_BLOCK_SIZE = 1 << 20
_CACHED_BLOCKS = 2


class EpochOrder:
    """Row index of every stream position.

    Args:
        n: rows in the source.
        seed: seeds every epoch's order (with ``key`` before it and the epoch after it).
        shuffle: ``False`` gives the identity order in every epoch.
        block_size: rows per block (see the module docstring).
        key: extra integers mixed into the seed, so two users of one seed draw independent orders.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, block_size: int = DEFAULT_BLOCK_SIZE,
                 key: Sequence[int] = ()) -> None:
        if n <= 0:
            raise ValueError("cannot order an empty source")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive (got {block_size})")
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.block_size = min(int(block_size), self.n)
        self.key = [int(k) for k in key]
        self.n_blocks = -(-self.n // self.block_size)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _block_len(self, block: np.ndarray | int) -> np.ndarray:
        start = np.asarray(block, dtype=np.int64) * self.block_size
        return np.minimum(start + self.block_size, self.n) - start

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block visited k-th ``[n_blocks]``, epoch offset where that visit starts ``[n_blocks]``)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle and self.n_blocks > 1:
                visit = np.random.default_rng([self.seed, *self.key, epoch, 0]).permutation(self.n_blocks)
            else:
                visit = np.arange(self.n_blocks)
            starts = np.concatenate([[0], np.cumsum(self._block_len(visit))[:-1]]).astype(np.int64)
            self._epoch_cache = (epoch, visit, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _within(self, epoch: int, block: int) -> np.ndarray:
        """Order of the rows of ``block`` in ``epoch`` (offsets inside the block)."""
        cached = self._blocks.get((epoch, block))
        if cached is not None:
            self._blocks.move_to_end((epoch, block))
            return cached
        size = int(self._block_len(block))
        if not self.shuffle:
            order = np.arange(size)
        elif self.n_blocks == 1:  # one block: the plain seeded permutation of all rows
            order = np.random.default_rng([self.seed, *self.key, epoch]).permutation(size)
        else:
            order = np.random.default_rng([self.seed, *self.key, epoch, 1 + block]).permutation(size)
        self._blocks[(epoch, block)] = order
        while len(self._blocks) > _CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return order

    def indices_at(self, positions: np.ndarray) -> np.ndarray:
        """int64 row indices ``[P]`` of stream positions ``[P]`` (any order, any epochs)."""
        pos = np.asarray(positions, dtype=np.int64)
        out = np.empty(pos.shape, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            visit, starts = self._epoch(int(epoch))
            q = offsets[in_epoch]
            k = np.searchsorted(starts, q, side="right") - 1  # which visit holds each position
            rows = np.empty(q.shape, dtype=np.int64)
            for visit_k in np.unique(k):
                sel = k == visit_k
                block = int(visit[visit_k])
                rows[sel] = block * self.block_size + self._within(int(epoch), block)[q[sel] - starts[visit_k]]
            out[in_epoch] = rows
        return out

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row indices ``[count]`` of stream positions ``[start, start + count)``."""
        return self.indices_at(np.arange(start, start + count, dtype=np.int64))

    def rank_indices(self, start: int, count: int, *, rank: int, world_size: int) -> np.ndarray:
        """This rank's rows among stream positions ``[start, start + count)``: every ``world_size``-th one."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        first = start + (rank - start) % world_size
        return self.indices_at(np.arange(first, start + count, world_size, dtype=np.int64))


class RankSampler(Sampler[int]):
    """A ``DataLoader`` sampler: one rank's share of an epoch, from a global stream position on.

    Rank ``r`` of ``W`` yields the rows of positions ``p`` with ``p % W == r`` in ``[start, epoch end)``, computed
    a chunk at a time (no list of the epoch is built). ``start`` is a global position, so a job restarted with
    another world size at position ``P`` reads each remaining row of the epoch exactly once over its ranks.

    Args:
        order: the global order.
        epoch: the epoch to read.
        rank, world_size: this process's place.
        start: global position inside ``epoch`` (samples already consumed by all ranks).
        chunk: positions computed at a time.
    """

    def __init__(self, order: EpochOrder, *, epoch: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 chunk: int = 65536) -> None:
        if not 0 <= start <= order.n:
            raise ValueError(f"start {start} is outside the epoch (0..{order.n})")
        self.order, self.epoch, self.rank, self.world_size = order, epoch, rank, world_size
        self.start, self.chunk = start, max(world_size, chunk - chunk % world_size)

    def __len__(self) -> int:
        first = self.start + (self.rank - self.start) % self.world_size
        return max(0, -(-(self.order.n - first) // self.world_size))

    def __iter__(self) -> Iterator[int]:
        # Ranks split the positions counted from the start of the epoch (so every epoch splits alike).
        base, step = self.epoch * self.order.n, self.chunk
        first = self.start + (self.rank - self.start) % self.world_size
        for lo in range(first, self.order.n, step):
            positions = np.arange(lo, min(lo + step, self.order.n), self.world_size, dtype=np.int64)
            yield from self.order.indices_at(base + positions).tolist()
