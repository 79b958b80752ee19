"""Turning request payloads into image bytes, safely.

Inputs are base64 strings or ``data:image/...;base64,`` URIs. The server never fetches URLs (that would let a
client make it reach internal hosts); such inputs are refused with a reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image

from dinoforge.core.errors import ImageDecodeError, ImageTooLargeError
from dinoforge.core.image_contract import (DECODER_ERRORS, SUPPORTED_FORMATS, check_image_budget, decode_error_reason,
                                       decode_image, decoded_pixels)
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


def probe(data: bytes, index: int, backend: Backend, max_pixels: int) -> int:
    """Read an image's header only: refuse it early (422 / 413) or return its decode cost in pixels.

    Every budget is checked here, on the event loop and before any worker decodes a pixel: the decoded size,
    the size the model's resize would produce (thin images), and :func:`decoded_pixels` for the request's
    pixel budget.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
        if fmt not in SUPPORTED_FORMATS:
            raise ImageDecodeError(f"unsupported image format {fmt}")
        cfg = backend.info.preprocessing
        check_image_budget(height, width, cfg, max_pixels=max_pixels)
        return decoded_pixels(width, height, fmt, cfg)
    except ImageTooLargeError as err:
        raise PayloadTooLarge(f"input[{index}]: {err}") from None
    except ImageDecodeError as err:
        raise InvalidInput(f"input[{index}]: {err}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"input[{index}]: image is over the decoded-pixel limit of {max_pixels} pixels "
                              "(decompression bomb guard)") from None
    except DECODER_ERRORS as err:
        raise InvalidInput(f"input[{index}]: not a decodable image: {decode_error_reason(err)}") from None


def check_request_pixels(costs: list[int], limit: int) -> None:
    """413 when a request's images together would decode more than ``limit`` pixels."""
    total = sum(costs)
    if total > limit:
        raise PayloadTooLarge(f"the request's {len(costs)} images decode to {total} pixels; this server decodes at "
                              f"most {limit} per request (split the request or send smaller images)")


def prepare(data: bytes, index: int, backend: Backend, max_pixels: int) -> np.ndarray:
    """Decode + preprocess one image (runs in the engine's worker pool).

    The image is decoded for the model's contract: JPEGs at a reduced scale, other formats box-reduced, when
    they are far larger than the model input (see :func:`~dinoforge.core.preprocess.decode_image`).

    Returns:
        float32 ``[3, H, W]`` model input.

    Raises:
        InvalidInput: not an image, unsupported format, truncated data.
        PayloadTooLarge: more decoded pixels than ``max_pixels``, or a resize beyond the budget.
    """
    try:
        image = decode_image(data, max_pixels=max_pixels, fit=backend.info.preprocessing)
    except ImageTooLargeError as err:
        raise PayloadTooLarge(f"input[{index}]: {err}") from None
    except ImageDecodeError as err:
        raise InvalidInput(f"input[{index}]: {err}") from None
    return backend.pre(image)
