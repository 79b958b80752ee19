"""The real-photo pool of the copy-detection work, split deterministically by file.

What counts as an original: every photo of a ``dinoforge photos`` collection (exact duplicates and resolution
variants were already dropped when it was built) whose shorter side is at least ``min_side`` pixels, except the
wallpapers, which are large enough to give two originals each: their left and right 45 % strips. The strips
share no pixel (a 10 % gap lies between them), so neither is an edit of the other; they are distinct images as
two photos of one scene are. Smaller photos (stamps, sprites) are never originals; they only serve to train the
descriptor's projection.

Split: a photo belongs to the ``train`` side when the SHA-256 of its collection id falls in the first
``train_percent`` of the range, else to the ``bench`` side; both strips of a wallpaper follow the wallpaper.
The projection is trained and calibrated on ``train`` and small photos only, the benchmark uses ``bench``
only, so no benchmark original (nor a crop of one) is seen in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image

from dinoforge.core.data.photos import MANIFEST_NAME
from dinoforge.core.errors import DataError

WALLPAPER_SOURCES = frozenset({"backgrounds", "plasma-wallpapers"})
Split = Literal["train", "bench", "small"]


@dataclass(frozen=True)
class PoolImage:
    """One original: a file of the collection, or a strip of one (``box`` as fractions of width)."""

    id: str
    path: Path
    source: str
    split: Split
    box: tuple[float, float] | None = None

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


def photo_pool(photos_dir: str | Path, *, min_side: int = 128, train_percent: int = 35) -> list[PoolImage]:
    """Every image of a ``dinoforge photos`` collection, labelled ``train`` / ``bench`` / ``small``.

    Raises:
        DataError: the folder holds no collection manifest.
    """
    root = Path(photos_dir)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist: build the collection first with dinoforge photos {root}")
    table = pd.read_csv(manifest)
    out: list[PoolImage] = []
    for row in table.itertuples(index=False):
        path = root / str(row.path)
        short = min(int(row.width), int(row.height))
        if short < min_side:
            out.append(PoolImage(str(row.id), path, str(row.source), "small"))
            continue
        split = split_of(str(row.id), train_percent)
        if row.source in WALLPAPER_SOURCES:
            out += [PoolImage(f"{row.id}@left", path, str(row.source), split, (0.0, 0.45)),
                    PoolImage(f"{row.id}@right", path, str(row.source), split, (0.55, 1.0))]
        else:
            out.append(PoolImage(str(row.id), path, str(row.source), split))
    return out


__all__ = ["PoolImage", "photo_pool", "split_of"]
