"""Calibration of the copy threshold against the job it serves: deduplicating a pool (``dinoforge dedup``).

Why not "at most 1 % of copies have an impostor above the threshold": that per-copy rule is set by the
densest neighbourhoods of the calibration photos (stamps on white, one wallpaper's series), lands far above the
similarity of most real copies, and says nothing about the precision of the groups a dedup run writes.
Instead, the calibration photos go through the same grouping the dedup step does: every clean photo, its
benchmark-style copies (:func:`copy_views`: one per edit family of the DISC21 list, crop + overlay and the
combinations; never the benchmark's unseen families) and the other training photos as distractors; pairs
among each image's ``k`` nearest neighbours at or above a threshold are grouped by the dedup step's own
rule (:func:`~.linkage.group_edges`, originals first so that they are the kept images), and removals are
scored by :func:`~.copydetect.score_removals`, as the benchmark's are. The threshold is the lowest one at
which the removals' precision is at least ``min_precision``; the record keeps the recall there.
Twins (:mod:`~.photopool`) count as one original, so a photo's twin is neither a copy nor an impostor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinoforge.curate import edits
from dinoforge.curate.copydetect import score_removals
from dinoforge.curate.copynet import RawFeatures, embed_views
from dinoforge.curate.linkage import Linkage, group_edges
from dinoforge.curate.photopool import PoolImage

#: The benchmark's edit families the calibration copies use (the unseen ones stay unseen).
SEEN_FAMILIES = tuple(f for f in edits.FAMILIES if f not in edits.UNSEEN)


def copy_views(images: list[PoolImage], raw: RawFeatures, seed: int) -> np.ndarray:
    """Raw features ``[N, 1 + F, D_raw]``: each image as it is, then one copy per :data:`SEEN_FAMILIES`."""
    return embed_views(images, raw, lambda im, rng: [edits.apply(f, im, rng) for f in SEEN_FAMILIES], seed)


def calibrate_dedup(clean: np.ndarray, copies: np.ndarray, others: np.ndarray, groups: list[str], *,
                    min_precision: float = 0.95, k: int = 16, linkage: Linkage = "kept",
                    grid: np.ndarray | None = None) -> dict[str, Any]:
    """Lowest threshold whose simulated dedup reaches ``min_precision``.

    Args:
        clean: unit descriptors ``[m, D]`` of the calibration photos.
        copies: their copies ``[m, V, D]``.
        others: unit descriptors ``[n, D]`` of distinct photos (distractors, never grouped with anything).
        groups: twin group of each clean photo (twins merge into one injected group).
        grid: thresholds tried (default 0.20, 0.21, ..., 0.99).
    """
    m, v, _ = copies.shape
    x = np.concatenate([clean, copies.reshape(m * v, -1), others])  # [N, D]; originals first, so they are kept
    key = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    twin = np.array([key[g] for g in groups])
    group = np.concatenate([twin, np.repeat(twin, v), -1 - np.arange(len(others))])
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :k]  # [N, k], the dedup step's k-NN graph
    a = np.repeat(np.arange(len(x)), nearest.shape[1])
    b = nearest.reshape(-1)
    w = sims[a, b]
    sizes = np.bincount(group[group >= 0])
    points = []
    for t in np.round(grid if grid is not None else np.arange(0.20, 1.0, 0.01), 4):
        keep = w >= t
        roots, _ = group_edges(len(x), [{"a": a[keep], "b": b[keep], "similarity": w[keep]}], linkage)
        removed = np.nonzero(roots != np.arange(len(x)))[0]
        score = score_removals(np.maximum(group[removed], -1), sizes)
        points.append((float(t), score["recall"], score["precision"]))
    good = [p for p in points if p[2] >= min_precision]
    t, recall, precision = min(good) if good else max(points)
    return {"threshold": t, "linkage": linkage, "k": k, "calibration": "simulated dedup",
            "min_precision": min_precision,
            "calibration_images": int(m), "calibration_copies": int(m * v), "calibration_distractors": len(others),
            "copy_recall_at_threshold": recall, "precision_at_threshold": precision,
            "curve": [[round(p[0], 2), round(p[1], 4), round(p[2], 4)] for p in points]}


__all__ = ["SEEN_FAMILIES", "calibrate_dedup", "copy_views"]
