"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``) as a labelled set of real object pictures.

The evaluation protocol uses seven categories (:data:`EVAL_CATEGORIES`: 422 stamps); each stamp is a PNG
with transparency, composited on white and fitted into a ``size`` x ``size`` white square (aspect kept,
centred). ``tuxpaint:eval`` opens those seven categories labelled by category, ``tuxpaint:other`` every
other category (training material; :mod:`.photos` uses it).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dinoforge.core.data.base import IndexedSource
from dinoforge.core.data.sample import Record
from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import decode_image

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
#: The categories of the tuxpaint k-NN protocol (never trained on).
EVAL_CATEGORIES = ("animals", "clothes", "food", "household", "plants", "town", "vehicles")
SPLITS = ("eval", "other")


def fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """``image`` (RGB) scaled to fit a ``size`` x ``size`` white square, centred, aspect kept."""
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


class TuxpaintSource(IndexedSource):
    """Tux Paint stamps labelled by their top-level category.

    Args:
        split: ``eval`` (the seven protocol categories) or ``other`` (the rest).
        size: side of the white square each stamp is fitted into.
        root: the stamps folder.

    Raises:
        DataError: unknown split, or the package is not installed.
    """

    def __init__(self, split: str = "eval", *, size: int = 224, root: str | Path = TUXPAINT_STAMPS) -> None:
        if split not in SPLITS:
            raise DataError(f"tuxpaint:{split}: unknown split; use one of {', '.join(SPLITS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"tuxpaint stamps not found at {self.root} (apt-get install tuxpaint-stamps-default)")
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = [c for c in folders if (c in EVAL_CATEGORIES) == (split == "eval")]
        if split == "eval" and self.classes != sorted(EVAL_CATEGORIES):
            raise DataError(f"{self.root} lacks evaluation categories {sorted(set(EVAL_CATEGORIES) - set(folders))}")
        self.size = size
        self.spec = f"tuxpaint:{split}"
        self._items = [(p, label) for label, c in enumerate(self.classes)
                       for p in sorted((self.root / c).rglob("*.png"))]

    def __len__(self) -> int:
        return len(self._items)

    def record(self, index: int) -> Record:
        path, label = self._items[index]
        return Record(id=path.relative_to(self.root).as_posix(), path=str(path), label=label)

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return fit_on_white(decode_image(self._items[index][0]), self.size)  # = record.path
