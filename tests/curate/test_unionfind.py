"""The streaming union-find against scipy's connected components."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinoforge.curate.unionfind import UnionFind, component_sizes


def test_components_match_scipy_with_edges_in_batches() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    a, b = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    uf = UnionFind(n)
    for lo in range(0, a.size, 700):  # edges arrive chunk by chunk, as from the edge files
        uf.union(a[lo:lo + 700], b[lo:lo + 700])
    roots = uf.roots()
    _, labels = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    # Same partition, and each root is the smallest node of its component.
    for comp in np.unique(labels):
        members = np.nonzero(labels == comp)[0]
        assert (roots[members] == members.min()).all()
    assert np.unique(roots).size == np.unique(labels).size
    np.testing.assert_array_equal(component_sizes(roots), np.bincount(labels)[labels])


def test_chain_and_duplicate_edges() -> None:
    uf = UnionFind(6)
    uf.union(np.array([5, 4, 3, 3]), np.array([4, 3, 2, 2]))
    uf.union(np.array([0]), np.array([0]))
    assert uf.roots().tolist() == [0, 1, 2, 2, 2, 2]
