"""Calibration of the copy threshold against the job it serves: deduplicating a pool (``dinoforge dedup``).

Why not "at most 1 % of copies have an impostor above the threshold": that per-copy rule is set by the
densest neighbourhoods of the calibration photos (stamps on white, one wallpaper's series), lands far above the
similarity of most real copies, and says nothing about the precision of the groups a dedup run writes.
Instead, the calibration photos go through the same grouping the dedup step does: every clean photo, its
benchmark-style copies (:func:`copy_views`: one per edit family of the DISC21 list, crop + overlay and the
combinations; never the benchmark's unseen families) and the other training photos as distractors; pairs
among each image's ``k`` nearest neighbours at or above a threshold are grouped by the dedup step's own
rule (:func:`~.linkage.group_edges`, originals first so that they are the kept images), and removals are
scored by :func:`~.copydetect.score_removals`, as the benchmark's are (:func:`simulate_dedup`). The threshold
is the lowest one at which the removals' precision is at least ``min_precision`` (:func:`pick_threshold`);
the record keeps the recall there. Removal counts of several photo sets add up, which is how
:func:`~.copyhead.cross_fit` calibrates on every fold at once.
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

#: Neighbours per image of the simulated dedup, as ``dinoforge dedup`` searches by default.
NEIGHBOURS = 16
#: The benchmark's edit families the calibration copies use (the unseen ones stay unseen).
SEEN_FAMILIES = tuple(f for f in edits.FAMILIES if f not in edits.UNSEEN)


def copy_views(images: list[PoolImage], raw: RawFeatures, seed: int) -> np.ndarray:
    """Raw features ``[N, 1 + F, D_raw]``: each image as it is, then one copy per :data:`SEEN_FAMILIES`."""
    return embed_views(images, raw, lambda im, rng: [edits.apply(f, im, rng) for f in SEEN_FAMILIES], seed)


def simulate_dedup(clean: np.ndarray, copies: np.ndarray, others: np.ndarray, groups: list[str], *, k: int = NEIGHBOURS,
                   linkage: Linkage = "kept", grid: np.ndarray | None = None) -> np.ndarray:
    """The dedup step's removals along a list of thresholds, scored against the injected copies.

    Args:
        clean: unit descriptors ``[m, D]`` of the calibration photos.
        copies: their copies ``[m, V, D]``.
        others: unit descriptors ``[n, D]`` of distinct photos (distractors, never grouped with anything).
        groups: twin group of each clean photo (twins merge into one injected group).
        grid: thresholds tried (default 0.20, 0.21, ..., 0.99).

    Returns:
        counts ``[T, 4]``: threshold, true removals, removals, removals due; counts of several photo sets
        (the folds of :mod:`~.copyhead`) add up column by column, thresholds aside.
    """
    m, v, _ = copies.shape
    x = np.concatenate([clean, copies.reshape(m * v, -1), others])  # [N, D]; originals first, so they are kept
    key = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    twin = np.array([key[g] for g in groups], dtype=np.int64)
    group = np.concatenate([twin, np.repeat(twin, v), -1 - np.arange(len(others))])
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :k]  # [N, k], the dedup step's k-NN graph
    a = np.repeat(np.arange(len(x)), nearest.shape[1])
    b = nearest.reshape(-1)
    w = sims[a, b]
    sizes = np.bincount(group[group >= 0])
    rows = []
    for t in np.round(grid if grid is not None else np.arange(0.20, 1.0, 0.01), 4):
        keep = w >= t
        roots, _ = group_edges(len(x), [{"a": a[keep], "b": b[keep], "similarity": w[keep]}], linkage)
        removed = np.nonzero(roots != np.arange(len(x)))[0]
        score = score_removals(np.maximum(group[removed], -1), sizes)
        rows.append((float(t), score["true_removals"], score["removed"], score["should_remove"]))
    return np.array(rows, dtype=np.float64)


def pick_threshold(counts: np.ndarray, min_precision: float) -> dict[str, Any]:
    """The lowest threshold of ``counts`` (:func:`simulate_dedup`) whose removals' precision reaches
    ``min_precision`` (else the most precise one, the highest of ties), with its recall and precision and the curve."""
    t, true, removed, due = counts.T
    recall = np.where(due > 0, true / np.maximum(due, 1), 1.0)
    precision = np.where(removed > 0, true / np.maximum(removed, 1), 1.0)
    good = np.nonzero(precision >= min_precision)[0]
    i = int(good[0]) if good.size else len(t) - 1 - int(np.argmax(precision[::-1]))  # ties: the highest
    return {"threshold": float(t[i]), "min_precision": min_precision,
            "copy_recall_at_threshold": float(recall[i]), "precision_at_threshold": float(precision[i]),
            "curve": [[round(float(a), 2), round(float(r), 4), round(float(p), 4)]
                      for a, r, p in zip(t, recall, precision, strict=True)]}


def calibrate_dedup(clean: np.ndarray, copies: np.ndarray, others: np.ndarray, groups: list[str], *,
                    min_precision: float = 0.95, k: int = NEIGHBOURS, linkage: Linkage = "kept",
                    grid: np.ndarray | None = None) -> dict[str, Any]:
    """Lowest threshold whose simulated dedup of one photo set reaches ``min_precision``
    (:func:`simulate_dedup` then :func:`pick_threshold`; arguments as there)."""
    counts = simulate_dedup(clean, copies, others, groups, k=k, linkage=linkage, grid=grid)
    m, v, _ = copies.shape
    return {**pick_threshold(counts, min_precision), "linkage": linkage, "k": k, "calibration": "simulated dedup",
            "calibration_images": int(m), "calibration_copies": int(m * v), "calibration_distractors": len(others)}


__all__ = ["NEIGHBOURS", "SEEN_FAMILIES", "calibrate_dedup", "copy_views", "pick_threshold", "simulate_dedup"]
