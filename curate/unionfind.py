"""Connected components of a duplicate graph whose edges arrive in batches (vectorised union-find).

Memory is one int64 parent per node, whatever the number of edges: edge batches are streamed from disk and
merged with array operations (hooking of roots by ``np.minimum.at`` and pointer jumping), so a graph of
hundreds of millions of edges is processed without holding it. Every component's root is its smallest
node, which makes "keep the first image of each component" a plain ``root == node`` test.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over nodes ``0..n-1``.

    Args:
        n: number of nodes.
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def _compress(self) -> np.ndarray:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent
        return parent

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of ``a[i]`` and ``b[i]`` for every ``i`` (int arrays of equal length)."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            raise ValueError(f"edge endpoint arrays differ in shape: {a.shape} vs {b.shape}")
        while a.size:
            parent = self._compress()
            ra, rb = parent[a], parent[b]
            differ = ra != rb
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            if not a.size:
                break
            # Hook the larger root under the smaller one; when a root gets several candidates, the smallest
            # wins and the other edges are merged in the next round.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))

    def roots(self) -> np.ndarray:
        """``int64 [n]``: the smallest node of each node's component."""
        return self._compress().copy()


def component_sizes(roots: np.ndarray) -> np.ndarray:
    """``int64 [n]``: size of each node's component."""
    counts = np.bincount(roots, minlength=roots.size)
    return counts[roots]
