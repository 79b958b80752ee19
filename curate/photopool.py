"""The real-photo pool of the copy-detection work, split deterministically by file.

What counts as an original: every photo of a ``dinoforge photos`` collection (exact duplicates and resolution
variants were already dropped when it was built) whose shorter side is at least ``min_side`` pixels, except the
wallpapers, which are large enough to give two originals each: their left and right 45 % strips. The strips
share no pixel (a 10 % gap lies between them), so neither is an edit of the other; they are distinct images as
two photos of one scene are. Smaller photos (stamps, sprites) are never originals; they only serve to train the
descriptor's projection.

Two more rules, from the pixels alone (so that no descriptor decides what its own benchmark contains), on the
32 x 32 grey thumbnail of every candidate original:

* **flat**: a thumbnail whose standard deviation is below :data:`FLAT_STD` (gradient and plain wallpapers,
  the strips of a striped one) has nothing of its own to match; such an image is never an original (split
  ``flat``). Every descriptor, hashes included, scores two of them as copies.
* **twins**: two candidates whose thumbnails correlate at :data:`TWIN_CORR` or more after mean and contrast
  normalisation, in either horizontal orientation, are one original shown twice: the same photo saved as JPEG
  and PNG, a chessboard shipped by two packages, two frames of an optical-flow pair, a stamp and its mirror,
  colour variants of one wallpaper. They form one ``group`` (connected components of the relation).

Split: a group belongs to the ``train`` side when the SHA-256 of its key (the smallest collection id among
its members and their wallpapers) falls in the first ``train_percent`` of the range, else to the ``bench``
side; both strips of a wallpaper follow the wallpaper, and twins follow each other. The projection is trained
and calibrated on ``train`` and small photos only, the benchmark uses ``bench`` only and at most one image of a
group, so no benchmark original (nor a twin or a crop of one) is seen in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from dinoforge.core.data.photos import MANIFEST_NAME
from dinoforge.core.errors import DataError
from dinoforge.curate.unionfind import UnionFind

WALLPAPER_SOURCES = frozenset({"backgrounds", "plasma-wallpapers"})
Split = Literal["train", "bench", "small", "flat"]
FLAT_STD = 0.04  # of the [0, 1] grey thumbnail: below it an image has no content of its own
TWIN_CORR = 0.95  # normalised thumbnail correlation at which two images are one original
_THUMB = 32


@dataclass(frozen=True)
class PoolImage:
    """One original: a file of the collection, or a strip of one (``box`` as fractions of width)."""

    id: str
    path: Path
    source: str
    split: Split
    box: tuple[float, float] | None = None
    group: str = ""  # twins share it (the smallest id among them); "" for small photos
    side: str = ""  # the key its split is drawn from: twins and both strips of a wallpaper share it

    def load(self) -> Image.Image:
        """The image (RGB), cut to its strip when it has one."""
        with Image.open(self.path) as im:
            im = im.convert("RGB")
        if self.box is None:
            return im
        return im.crop((round(self.box[0] * im.width), 0, round(self.box[1] * im.width), im.height))


def split_of(key: str, train_percent: int) -> Literal["train", "bench"]:
    """``train`` for the first ``train_percent`` % of the SHA-256 range of ``key``, else ``bench``."""
    return "train" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < train_percent else "bench"


def thumbnail(item: PoolImage) -> np.ndarray:
    """The grey thumbnail ``[32, 32]`` in [0, 1] (box filter: every pixel counts)."""
    grey = item.load().convert("L").resize((_THUMB, _THUMB), Image.Resampling.BOX)
    return np.asarray(grey, np.float32) / 255


def twin_pairs(thumbs: np.ndarray) -> list[tuple[int, int]]:
    """Index pairs ``i < j`` of twins among thumbnails ``[N, 32, 32]``: Pearson correlation of the pixels at
    :data:`TWIN_CORR` or more, with ``j`` as it is or mirrored."""
    n = len(thumbs)
    z = thumbs - thumbs.mean(axis=(1, 2), keepdims=True)
    z = z / np.maximum(z.std(axis=(1, 2), keepdims=True), 1e-6)
    rows = z.reshape(n, -1) / z[0].size if n else z.reshape(0, 1)
    corr = np.maximum(rows @ z.reshape(n, -1).T, rows @ z[:, :, ::-1].reshape(n, -1).T)
    i, j = np.nonzero(np.triu(corr >= TWIN_CORR, k=1))
    return list(zip(i.tolist(), j.tolist(), strict=True))


def _components(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """The component (its smallest item) of each of ``n`` items under the union of ``pairs``."""
    uf = UnionFind(n)
    if pairs:
        a, b = np.array(pairs, dtype=np.int64).T
        uf.union(a, b)
    return uf.roots()


def photo_pool(photos_dir: str | Path, *, min_side: int = 128, train_percent: int = 35) -> list[PoolImage]:
    """Every image of a ``dinoforge photos`` collection, labelled ``train`` / ``bench`` / ``small`` / ``flat``,
    in the collection's order, candidates with their twin ``group``.

    Raises:
        DataError: the folder holds no collection manifest.
    """
    root = Path(photos_dir)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist: build the collection first with dinoforge photos {root}")
    table = pd.read_csv(manifest)
    out: list[PoolImage] = []
    cands: list[int] = []  # positions in ``out`` of the candidate originals
    for row in table.itertuples(index=False):
        path, source = root / str(row.path), str(row.source)
        if min(int(row.width), int(row.height)) < min_side:
            out.append(PoolImage(str(row.id), path, source, "small"))
            continue
        boxes = [("@left", (0.0, 0.45)), ("@right", (0.55, 1.0))] if source in WALLPAPER_SOURCES else [("", None)]
        for suffix, box in boxes:
            cands.append(len(out))
            out.append(PoolImage(f"{row.id}{suffix}", path, source, "bench", box, group=str(row.id)))
    thumbs = np.stack([thumbnail(out[c]) for c in cands]) if cands else np.zeros((0, _THUMB, _THUMB), np.float32)
    flat = thumbs.reshape(len(cands), -1).std(axis=1) < FLAT_STD
    keep = np.nonzero(~flat)[0]
    twins = [(int(keep[i]), int(keep[j])) for i, j in twin_pairs(thumbs[keep])]
    wallpaper = [(k, k + 1) for k in range(len(cands) - 1) if out[cands[k]].group == out[cands[k + 1]].group]
    group, side = _components(len(cands), twins), _components(len(cands), twins + wallpaper)
    group_key: dict[int, str] = {}
    side_key: dict[int, str] = {}
    for k, c in enumerate(cands):  # a component's key: its smallest id (strips: the wallpaper's id)
        group_key[group[k]] = min(group_key.get(group[k], out[c].id), out[c].id)
        side_key[side[k]] = min(side_key.get(side[k], out[c].group), out[c].group)
    for k, c in enumerate(cands):
        split: Split = "flat" if flat[k] else split_of(side_key[side[k]], train_percent)
        out[c] = replace(out[c], split=split, group=group_key[group[k]], side=side_key[side[k]])
    return out


__all__ = ["FLAT_STD", "TWIN_CORR", "PoolImage", "photo_pool", "split_of", "thumbnail", "twin_pairs"]
