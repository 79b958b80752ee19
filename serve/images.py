"""Turning request payloads into image bytes, safely.

Inputs are base64 strings or ``data:image/...;base64,`` URIs. The server never fetches URLs (that would let a
client make it reach internal hosts); such inputs are refused with a reason.
"""

from __future__ import annotations

import base64
import binascii
import re

import torch

from dinoforge.core.errors import ImageDecodeError, ImageTooLargeError
from dinoforge.core.preprocess import decode_image
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.errors import InvalidInput, PayloadTooLarge

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/=_-]*$")


def decode_input(item: str, index: int) -> bytes:
    """One request input -> raw image bytes.

    Args:
        item: base64 (standard or URL-safe alphabet, padding optional) or a base64 data URI.
        index: position in the request, named in error messages.

    Raises:
        InvalidInput: a URL, a non-base64 data URI, malformed base64, or empty data.
    """
    where = f"input[{index}]"
    text = item.strip()
    if _URL.match(text):
        raise InvalidInput(f"{where}: URLs are not fetched by this server; send the image bytes as base64 "
                           "or a data URI")
    match = _DATA_URI.match(text)
    if match:
        if not match.group("b64"):
            raise InvalidInput(f"{where}: data URI is not base64-encoded (expected ';base64,')")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise InvalidInput(f"{where}: data URI has media type {mime!r}, expected image/*")
        text = text[match.end():]
    raw = "".join(text.split()).encode("ascii", errors="replace")
    if not raw:
        raise InvalidInput(f"{where}: empty image data")
    if not _B64_CHARS.match(raw):
        raise InvalidInput(f"{where}: not valid base64 (unexpected characters)")
    raw = raw.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"{where}: not valid base64 ({err})") from None
    if not data:
        raise InvalidInput(f"{where}: empty image data")
    return data


def check_count(n: int, limit: int) -> None:
    """Refuse empty requests (422) and more images than ``limit`` (413)."""
    if n == 0:
        raise InvalidInput("input is empty: send at least one image")
    if n > limit:
        raise PayloadTooLarge(f"{n} images in one request; this server accepts at most {limit} "
                              "(split the request)")


def prepare(data: bytes, index: int, backend: Backend, max_pixels: int) -> torch.Tensor:
    """Decode + preprocess one image (runs in the engine's worker pool).

    Returns:
        float32 ``[3, H, W]`` model input.

    Raises:
        InvalidInput: not an image, unsupported format, truncated data.
        PayloadTooLarge: more decoded pixels than ``max_pixels``.
    """
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as err:
        raise PayloadTooLarge(f"input[{index}]: {err}") from None
    except ImageDecodeError as err:
        raise InvalidInput(f"input[{index}]: {err}") from None
    return backend.pre(image)
