"""Spherical k-means on streamed collections (faiss), and hierarchical k-means with resampling.

``train_centroids`` fits k-means on a seeded sample (faiss caps it at ``max_points_per_centroid`` points per
centroid anyway); ``assign`` streams the whole collection against the centroids. Both work on L2-normalised
vectors (cosine geometry), like every other step.

Hierarchical k-means with resampling (after Vo et al., 2024, "Automatic data curation for self-supervised
learning: a clustering-based approach"): level 1 clusters the points, level ``t`` clusters the centroids of
level ``t - 1``. After each k-means, a resampling step keeps the ``r`` members closest to each centroid and
re-fits the centroids on that resampled set (starting from the current centroids): every cluster then
weighs the same, so centroids spread over the support of the data instead of piling up in its densest
regions — which is what balanced sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from dinoforge.core.index import VectorSource, l2_normalize, sample_rows


def kmeans_plus_plus(x: np.ndarray, k: int, *, seed: int, max_points: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding on (at most ``max_points`` sampled rows of) normalised ``x [n, d]``.

    Candidates for each centre after the first are drawn with probability proportional to the squared distance
    to the nearest centre already chosen, so small far-away modes get a centre; faiss's own initialisation is
    a uniform sample, which misses modes holding under ~1/k of the points. Of ``2 + ln k`` candidates, the
    one that lowers the total squared distance most is kept (greedy k-means++): a single draw lands in an
    already covered mode with a probability of a few percent per centre, and Lloyd iterations never move a
    centre out of a well-separated mode, so another mode would stay merged with a neighbour for good.
    """
    rng = np.random.default_rng(seed)
    if max_points is not None and x.shape[0] > max_points:
        x = x[np.sort(rng.choice(x.shape[0], max_points, replace=False))]
    trials = 2 + int(np.log(k))
    sq_norms = (x * x).sum(axis=1, dtype=np.float64)  # [n]

    def sq_dist(rows: np.ndarray) -> np.ndarray:  # rows [m] -> [m, n], float64 so that rng.choice's p sums to 1
        dots = (x[rows] @ x.T).astype(np.float64)
        return np.maximum(sq_norms[None] - 2 * dots + sq_norms[rows, None], 0.0)

    picks = [int(rng.integers(x.shape[0]))]
    d2 = sq_dist(np.array(picks))[0]  # [n] squared distance to the nearest chosen centre
    for _ in range(1, k):
        total = float(d2.sum())
        candidates = rng.choice(x.shape[0], size=trials, p=d2 / total) if total > 0 \
            else rng.integers(x.shape[0], size=1)
        after = np.minimum(d2[None], sq_dist(candidates))  # [trials, n]
        best = int(after.sum(axis=1).argmin())
        picks.append(int(candidates[best]))
        d2 = after[best]
    return np.ascontiguousarray(x[picks], dtype=np.float32)


def fit_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: np.ndarray | None = None,
               max_points_per_centroid: int = 256) -> np.ndarray:
    """Spherical k-means of in-memory float32 ``x [n, d]`` (normalised here); returns ``[k, d]`` centroids.

    Initialised with ``init`` when given, else with k-means++ on up to ``32 k`` sampled rows.
    """
    x = l2_normalize(x)
    k = min(k, x.shape[0])
    start = init[:k] if init is not None else kmeans_plus_plus(x, k, seed=seed, max_points=32 * k)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(x, init_centroids=np.ascontiguousarray(start, dtype=np.float32))
    return l2_normalize(km.centroids)


def train_centroids(source: VectorSource, k: int, *, niter: int, seed: int,
                    max_points_per_centroid: int = 256) -> np.ndarray:
    """Spherical k-means on a seeded sample of at most ``k * max_points_per_centroid`` rows of ``source``."""
    rows = sample_rows(source.num_rows, k * max_points_per_centroid, seed)
    return fit_kmeans(source.take(rows), k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid)


def assign(source: VectorSource, centroids: np.ndarray, *, chunk_rows: int = 65_536) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """Nearest centroid of every row (cosine).

    Returns:
        ``labels [n]`` int64 and ``similarity [n]`` float32 to the assigned centroid.
    """
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(source.num_rows, dtype=np.int64)
    sims = np.empty(source.num_rows, dtype=np.float32)
    for start, chunk in source.iter_chunks(chunk_rows):
        s, i = index.search(l2_normalize(chunk), 1)  # [m, 1]
        labels[start:start + len(chunk)], sims[start:start + len(chunk)] = i[:, 0], s[:, 0]
    return labels, sims


def closest_members(labels: np.ndarray, sims: np.ndarray, r: int) -> np.ndarray:
    """Sorted indices of the ``r`` members closest to their centroid, for every cluster."""
    order = np.lexsort((-sims, labels))  # by cluster, then most similar first
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")  # first position of each one's cluster
    rank = np.arange(order.size) - starts
    return np.sort(order[rank < r])


@dataclass
class Hierarchy:
    """Result of hierarchical k-means.

    Attributes:
        centroids: per level, ``[k_t, d]`` (finest first).
        labels: per level, the cluster of each element of that level's input (points for level 0, the
            previous level's centroids above).
    """

    centroids: list[np.ndarray]
    labels: list[np.ndarray]

    def point_clusters(self) -> np.ndarray:
        """``[n_points, levels]``: the cluster of every point at every level."""
        cols = [self.labels[0]]
        for lab in self.labels[1:]:
            cols.append(lab[cols[-1]])
        return np.stack(cols, axis=1)


def _resampled_fit(source: VectorSource, centroids: np.ndarray, *, steps: int, r: int, niter: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, sims = assign(source, centroids)
    for step in range(steps):
        members = closest_members(labels, sims, r)
        centroids = fit_kmeans(source.take(members), centroids.shape[0], niter=niter, seed=seed + step + 1,
                               init=centroids)
        labels, sims = assign(source, centroids)
    return centroids, labels, sims


def hierarchical_kmeans(source: VectorSource, levels: tuple[int, ...], *, resampling_steps: int,
                        resample_size: int, niter: int, seed: int) -> Hierarchy:
    """Hierarchical k-means with resampling (see the module docstring).

    Args:
        source: the points (streamed; only sampled rows are held in memory).
        levels: clusters per level, finest first (each at most the size of the level below).
        resampling_steps: resampling rounds after each level's k-means.
        resample_size: members per cluster kept by a resampling round.
        niter: Lloyd iterations per k-means.
        seed: base seed.
    """
    from dinoforge.core.index import ArrayVectors

    centroids_per_level, labels_per_level = [], []
    current: VectorSource = source
    for level, k in enumerate(levels):
        k = min(k, current.num_rows)
        init = train_centroids(current, k, niter=niter, seed=seed + 100 * level)
        centroids, labels, _ = _resampled_fit(current, init, steps=resampling_steps, r=resample_size, niter=niter,
                                              seed=seed + 100 * level)
        centroids_per_level.append(centroids)
        labels_per_level.append(labels)
        current = ArrayVectors(centroids)
    return Hierarchy(centroids_per_level, labels_per_level)
