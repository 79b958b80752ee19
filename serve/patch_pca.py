"""Patch-token PCA pictures (the DINOv2 visualisation), in numpy: one place for the page's API and ``viz pca``.

Recipe: project the patch tokens on their first principal component and threshold it to split foreground from
background; run a second PCA on the foreground patches only and show its first three components as RGB (the
background stays black). With several images the PCA is *joint*: fitted on all their patches at once, so the
same part (a wheel, a head) gets the same colour in every picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: fewer foreground patches than this (or all of them but this many) and the mask is not trusted
MIN_PATCHES = 3


@dataclass(frozen=True)
class PatchPCA:
    """The picture of one image.

    Attributes:
        rgb: uint8 ``[h, w, 3]``, one pixel per patch; background patches are black.
        mask: bool ``[h, w]``, the foreground patches (first component above the threshold).
    """

    rgb: np.ndarray
    mask: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])


def _components(x: np.ndarray, k: int) -> np.ndarray:
    """Scores of ``x [M, D]`` on its first ``k`` principal components, ``[M, k]`` (zero-padded past rank).

    Each component's sign is fixed (largest loading positive) so the colours of one image do not flip
    between runs.
    """
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt: [min(M, D), D]
    vt = vt[:k]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    scores = centred @ (vt * signs[:, None]).T  # [M, k']
    return np.pad(scores, ((0, 0), (0, k - scores.shape[1])))


def _border(grids: list[tuple[int, int]]) -> np.ndarray:
    """bool ``[M]``: the patches on the outer ring of each image's grid."""
    parts = []
    for h, w in grids:
        ring = np.zeros((h, w), dtype=bool)
        ring[[0, -1], :] = True
        ring[:, [0, -1]] = True
        parts.append(ring.ravel())
    return np.concatenate(parts)


def _foreground(first: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Threshold the first component at its mean; the side the image borders mostly fall on is background."""
    if border.any() and first[border].mean() > first.mean():
        first = -first
    mask = first > 0
    if mask.sum() < MIN_PATCHES or (~mask).sum() < MIN_PATCHES:
        return np.ones_like(mask)  # no clear split (a texture, a tiny grid): colour every patch
    return mask


def _to_uint8(scores: np.ndarray) -> np.ndarray:
    """Scale each column of ``scores [F, 3]`` to 0-255 between its 1st and 99th percentiles."""
    lo, hi = np.percentile(scores, 1, axis=0), np.percentile(scores, 99, axis=0)
    scaled = (scores - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


def patch_pca(tokens: list[np.ndarray], grids: list[tuple[int, int]]) -> list[PatchPCA]:
    """Joint patch PCA of one or more images.

    Args:
        tokens: per image, its patch tokens ``[h*w, D]`` (registers excluded), row-major over the grid.
        grids: per image, its patch grid ``(h, w)``.

    Returns:
        One :class:`PatchPCA` per image, coloured by the components fitted on all images together.

    Raises:
        ValueError: a token count that does not match its grid, or mixed token widths.
    """
    if len(tokens) != len(grids) or not tokens:
        raise ValueError("patch_pca needs one grid per token array, and at least one image")
    for t, (h, w) in zip(tokens, grids, strict=True):
        if t.ndim != 2 or t.shape[0] != h * w:
            raise ValueError(f"patch tokens {t.shape} do not match a {h}x{w} grid")
    x = np.concatenate([np.asarray(t, dtype=np.float64) for t in tokens])  # [M, D]
    mask = _foreground(_components(x, 1)[:, 0], _border(grids))  # [M]
    rgb = np.zeros((len(x), 3), dtype=np.uint8)
    rgb[mask] = _to_uint8(_components(x[mask], 3))
    out, start = [], 0
    for h, w in grids:
        stop = start + h * w
        out.append(PatchPCA(rgb=rgb[start:stop].reshape(h, w, 3), mask=mask[start:stop].reshape(h, w)))
        start = stop
    return out
