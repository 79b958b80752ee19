"""What the client accepts as images: files, folders (recursive), PIL images, raw bytes — read lazily."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from dinoforge.core.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
ImageLike = Union[str, os.PathLike, Image.Image, bytes]  # noqa: UP007 - runtime alias


@dataclass(frozen=True)
class ImageRef:
    """One image to send: its display name and how to get its bytes (read only when its batch is sent)."""

    name: str
    source: str | Path | Image.Image | bytes

    def read(self) -> bytes:
        """The encoded image file (PIL images are encoded as lossless PNG)."""
        src = self.source
        if isinstance(src, bytes):
            return src
        if isinstance(src, Image.Image):
            buf = io.BytesIO()
            src.save(buf, format="PNG")
            return buf.getvalue()
        try:
            return Path(src).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image {src}: {err}") from err

    def b64(self) -> str:
        """Base64 of :meth:`read` (the JSON API's input format)."""
        return base64.b64encode(self.read()).decode("ascii")


def _folder_images(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def expand_images(images: ImageLike | Iterable[ImageLike]) -> list[ImageRef]:
    """Flatten the accepted inputs into :class:`ImageRef` s, in order (folders sorted by relative path).

    Raises:
        DataError: a path that does not exist, or a folder without images.
    """
    items: Sequence[ImageLike]
    if isinstance(images, (str, os.PathLike, Image.Image, bytes)):
        items = [images]
    else:
        items = list(images)
    refs: list[ImageRef] = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            refs.append(ImageRef(f"bytes[{i}]", item))
        elif isinstance(item, Image.Image):
            refs.append(ImageRef(getattr(item, "filename", "") or f"image[{i}]", item))
        else:
            path = Path(item)
            if path.is_dir():
                found = _folder_images(path)
                if not found:
                    raise DataError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                refs.extend(ImageRef(str(p), p) for p in found)
            elif path.is_file():
                refs.append(ImageRef(str(path), path))
            else:
                raise DataError(f"{path} does not exist")
    return refs
