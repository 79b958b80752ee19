"""Image folder source: every image under a root, labelled by first-level sub-folder when there are classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from dinoforge.core.data.base import IndexedSource
from dinoforge.core.data.sample import Record
from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import DEFAULT_MAX_PIXELS, decode_image

#: File extensions (lower case) treated as images by folder sources.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

LabelMode = Literal["auto", "subfolders", "none"]


def _scan(root: Path, extensions: frozenset[str]) -> list[str]:
    """Relative POSIX paths of the images under ``root``, sorted (hidden files and folders skipped)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _has_classes(rel_paths: list[str]) -> bool:
    # Labelled when nothing lies directly in the root: every image sits inside a class folder.
    return bool(rel_paths) and all("/" in p for p in rel_paths)


class ImageFolderSource(IndexedSource):
    """Images found recursively under ``root``, in sorted relative-path order.

    Args:
        root: the folder.
        labels: ``auto`` (class folders when every image lies in a first-level sub-folder), ``subfolders``
            (require class folders) or ``none`` (unlabelled).
        classes: fixed class-name order (e.g. the training set's); a class folder not in it is an error.
            Default: the sorted names of the class folders.
        extensions: lower-case suffixes treated as images.
        max_pixels: decompression-bomb guard passed to ``decode_image``.

    Raises:
        DataError: missing root, no images, or class folders inconsistent with ``classes``.
    """

    def __init__(self, root: str | Path, *, labels: LabelMode = "auto", classes: Sequence[str] | None = None,
                 extensions: frozenset[str] = IMAGE_EXTENSIONS, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory")
        self.spec = f"folder:{self.root}"
        self.max_pixels = max_pixels
        self.files = _scan(self.root, extensions)
        if not self.files:
            raise DataError(f"image folder {self.root} holds no images "
                            f"(extensions {', '.join(sorted(extensions))})")
        labelled = labels == "subfolders" or (labels == "auto" and _has_classes(self.files))
        if labels == "subfolders" and not _has_classes(self.files):
            loose = next(p for p in self.files if "/" not in p)
            raise DataError(f"{self.root}: labels='subfolders' but {loose} is not inside a class folder")
        self._labels: list[int | None] = [None] * len(self.files)
        if labelled:
            self._assign_labels(classes)

    def _assign_labels(self, classes: Sequence[str] | None) -> None:
        folders = sorted({p.split("/", 1)[0] for p in self.files})
        if classes is None:
            classes = folders
        index = {name: i for i, name in enumerate(classes)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DataError(f"{self.root}: class folders {unknown[:5]} are not among the given classes "
                            f"({len(classes)} names, e.g. {list(classes)[:5]})")
        self.classes = list(classes)
        self._labels = [index[p.split("/", 1)[0]] for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def record(self, index: int) -> Record:
        rel = self.files[index]
        return Record(id=rel, path=str(self.root / rel), label=self._labels[index])

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return decode_image(self.root / self.files[index], max_pixels=self.max_pixels)  # = record.path
