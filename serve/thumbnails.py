"""Thumbnails kept inside an index directory, named by a hash of the item id.

The page shows them without ever opening a path a client names: a thumbnail's file name is derived from the id,
and only files under ``INDEX/thumbs/`` are read.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

from PIL import Image

from dinoforge.core.fileio import atomic_write_bytes

THUMBS_DIR = "thumbs"
#: longest side of a stored thumbnail (px): sharp in a grid cell, a few kB as JPEG
THUMB_SIDE = 192


def thumb_path(index_dir: Path, item_id: str) -> Path:
    """Where the thumbnail of ``item_id`` lives (whether or not it exists)."""
    name = hashlib.blake2b(item_id.encode("utf-8"), digest_size=16).hexdigest()
    return index_dir / THUMBS_DIR / name[:2] / f"{name}.jpg"


def encode_thumbnail(image: Image.Image, side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of ``image`` shrunk (never enlarged) to at most ``side`` px, on white where transparent."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        image = canvas
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_thumbnail(index_dir: Path, item_id: str, image: Image.Image, side: int = THUMB_SIDE) -> None:
    """Store the thumbnail of ``item_id`` (atomically: a crash never leaves half a file)."""
    path = thumb_path(index_dir, item_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_thumbnail(image, side))


def thumbnail_data_uri(index_dir: Path | None, item_id: str) -> str | None:
    """``data:image/jpeg;base64,...`` of the stored thumbnail, or ``None`` when the item has none."""
    if index_dir is None:
        return None
    path = thumb_path(index_dir, item_id)
    try:
        data = path.read_bytes()
    except OSError:
        return None  # indexed through POST /v1/index, or built without thumbnails
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
