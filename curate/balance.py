"""Step 5 — balancing: top-down balanced sampling from a hierarchical k-means tree.

The target size is split equally among the top-level clusters; a cluster holding fewer points than its
share gives all of them and the rest is redistributed among the others ("water filling"). Each cluster's
quota is then split the same way among its children, down to the finest clusters, where points are drawn
uniformly at random (seeded). Dominant modes of the data are thereby capped and rare ones kept whole.

Outputs (``balance/``): ``selected.parquet`` (pool row, cluster at every level), ``centroids.npz``,
``clusters.parquet`` (finest cluster, size before and after) and ``report.json``.
"""

from __future__ import annotations

import numpy as np

from dinoforge.curate.kmeans import Hierarchy


def water_fill(capacities: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas ``q_i <= capacities_i`` summing to ``min(total, sum(capacities))``, as equal as possible.

    Leftover units after the equal split go to the clusters with the largest spare capacity, lowest index
    first, so the result is deterministic.
    """
    caps = np.asarray(capacities, dtype=np.int64)
    total = int(min(total, caps.sum()))
    quotas = np.zeros_like(caps)
    remaining, open_ = total, caps > 0
    while remaining > 0 and open_.any():
        share = remaining // int(open_.sum())
        if share == 0:
            spare = np.where(open_, caps - quotas, -1)
            for i in np.argsort(-spare, kind="stable")[:remaining]:
                quotas[i] += 1
            break
        add = np.where(open_, np.minimum(share, caps - quotas), 0)
        quotas += add
        remaining -= int(add.sum())
        open_ = quotas < caps
    return quotas


def balanced_sample(tree: Hierarchy, target: int, *, seed: int) -> np.ndarray:
    """Sorted point indices chosen by top-down balanced sampling (at most ``target``)."""
    rng = np.random.default_rng(seed)
    clusters = tree.point_clusters()  # [n, levels], finest first
    levels = clusters.shape[1]
    chosen: list[np.ndarray] = []

    def visit(members: np.ndarray, level: int, quota: int) -> None:
        if quota <= 0 or members.size == 0:
            return
        if level < 0:
            chosen.append(rng.choice(members, size=min(quota, members.size), replace=False))
            return
        labels = clusters[members, level]
        groups = np.unique(labels)
        caps = np.array([(labels == g).sum() for g in groups])
        for g, q in zip(groups, water_fill(caps, quota), strict=True):
            visit(members[labels == g], level - 1, int(q))

    visit(np.arange(clusters.shape[0]), levels - 1, target)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
