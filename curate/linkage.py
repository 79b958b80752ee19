"""How the near-duplicate edges of a pool become groups that keep one image each.

Two rules, both returning a "root" per row (the kept row it belongs to; ``root == row`` for a kept row):

* ``components``: connected components of the edges (streamed union-find, :class:`~.unionfind.UnionFind`);
  each component keeps its first row. Memory is one integer per row whatever the number of edges, which is
  what a pool of hundreds of millions of images needs. The price is chaining: A ~ B and B ~ C join A and C
  however unlike they are, so related photos (two halves of one wallpaper, a stereo pair) pull each other's
  copies into one group and whole groups are removed.
* ``kept``: rows are visited in order (the dedup tool orders them largest first); a row is removed when one
  of its edges leads to an earlier row that is kept, and joins the most similar such row; otherwise it is
  kept. Every removed image is then itself a near-duplicate of the image kept for it: no chains. All edges
  above the threshold are held at once (three numbers each).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

import numpy as np

from dinoforge.curate.unionfind import UnionFind

Linkage = Literal["components", "kept"]
LINKAGES: tuple[Linkage, ...] = get_args(Linkage)


def attach_to_kept(n: int, a: np.ndarray, b: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """The ``kept`` rule over undirected edges ``a[i] -- b[i]`` (all at or above the threshold); between
    equally similar kept rows, the smaller one.

    Returns:
        ``int64 [n]``: each row's kept row (itself when kept; always a smaller row otherwise).
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    real = lo != hi
    lo, hi, w = lo[real], hi[real], np.asarray(similarity)[real]
    order = np.lexsort((lo, -w, hi))  # by later row, then most similar first, then the smaller row
    lo, hi = lo[order], hi[order]
    root = np.arange(n, dtype=np.int64)
    nodes, starts = np.unique(hi, return_index=True)
    ends = np.append(starts[1:], hi.size)[:starts.size]  # no edges: no rows to visit
    for node, start, end in zip(nodes.tolist(), starts.tolist(), ends.tolist(), strict=True):
        earlier = lo[start:end]  # all decided already: every one is a smaller row
        kept = earlier[root[earlier] == earlier]
        if kept.size:
            root[node] = kept[0]
    return root


def group_edges(n: int, chunks: Iterable[dict[str, np.ndarray]], linkage: Linkage,
                exact: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """Roots of ``n`` rows under ``linkage`` from edge chunks (``a``, ``b``, ``similarity``; empty dicts skipped).

    Args:
        exact: ``(first, other)`` rows of the exact pass: ``other`` goes wherever ``first`` goes.

    Returns:
        ``(roots int64 [n], number of edges read)``.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    first, other = exact if exact is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    edges = 0
    if linkage == "components":
        uf = UnionFind(n)
        uf.union(first, other)
        for part in chunks:  # one chunk at a time: the edges never need to fit in memory together
            if part:
                uf.union(part["a"], part["b"])
                edges += int(part["a"].size)
        return uf.roots(), edges
    parts = [p for p in chunks if p]
    edges = sum(int(p["a"].size) for p in parts)
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in ("a", "b", "similarity")}
    root = attach_to_kept(n, cat["a"], cat["b"], cat["similarity"])
    root[other] = root[first]  # a pixel-identical copy follows its first (which the near pass may have removed)
    return root, edges


__all__ = ["LINKAGES", "Linkage", "attach_to_kept", "group_edges"]
