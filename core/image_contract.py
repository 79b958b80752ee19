"""The preprocessing contract and image decoding, without torch.

:class:`PreprocessConfig` is the contract stored in every model card; :func:`decode_image` turns any common
image file into RGB (first frame, EXIF orientation, alpha on white) under pixel budgets; the geometry helpers
say what size each step produces. The pixel arithmetic lives in two implementations of the same contract:
:mod:`dinoforge.core.preprocess` (torch, used by training and evaluation) and
:mod:`dinoforge.core.preprocess_np` (numpy, used by the torch-free edge runtime); a test holds them equal.

Modes (:class:`PreprocessConfig.mode`):

* ``center_crop``: resize the shorter side to ``resize_size``, centre-crop ``size x size`` (DINOv2 eval).
* ``resize``: resize to ``size x size`` ignoring aspect (small images such as Fashion-MNIST).
* ``patch_multiple``: resize the shorter side to ``size`` keeping aspect, each side rounded to the nearest
  multiple of ``patch_size`` (at least one patch) — any image size works, never an assertion error.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import ImageDecodeError, ImageTooLargeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Formats accepted by :func:`decode_image`.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
#: Default decoded-pixel limit (decompression-bomb guard): 64 megapixels.
DEFAULT_MAX_PIXELS = 64_000_000
#: Default limit on the pixels the resize step produces. The shorter side is scaled to the contract's size, so a
#: thin image (1 x N) grows by that factor squared: 1 x 2000 would become 256 x 512000 float32 RGB (1.5 GB).
#: 4 Mpx (48 MB of float32 RGB) still admits a 60:1 panorama at a 256 px shorter side.
DEFAULT_MAX_RESIZED_PIXELS = 4_000_000
#: Decoding at reduced scale (JPEG draft, ``Image.reduce``) keeps at least this factor above the size the contract
#: resizes to, so the final antialiased resize still sees enough pixels (Pillow's ``reducing_gap`` idea).
REDUCING_GAP = 2.0
#: Images up to this many pixels are decoded exactly (so serving matches extraction on ordinary photos); only
#: larger ones take the reduced-scale path, where the result differs slightly from a full decode.
REDUCE_ABOVE_PIXELS = 4_000_000


class PreprocessConfig(StrictModel):
    """The preprocessing contract stored in every model card."""

    mode: Literal["center_crop", "resize", "patch_multiple"] = "center_crop"
    size: int = Field(224, gt=0, description="Crop side, output side, or shorter side (patch_multiple).")
    resize_size: int | None = Field(256, gt=0, description="Shorter side before the centre crop.")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = Field(14, gt=0)

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if any(s <= 0 for s in self.std):
            raise ValueError("std entries must be positive")
        if self.mode == "center_crop" and self.resize_size is not None and self.resize_size < self.size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop size {self.size}")
        rest = self.size % self.patch_size
        if self.mode != "patch_multiple" and rest:
            # the patch embedding floors the grid: the last pixel rows/columns would never reach the model
            below, above = self.size - rest, self.size - rest + self.patch_size
            hint = f"{below} or {above}" if below else str(above)
            raise ValueError(f"size {self.size} is not a multiple of patch_size {self.patch_size}: the backbone "
                             f"would ignore the last {rest} pixel rows and columns (use {hint})")
        return self


# ---------------------------------------------------------------------------------------------- decoding
def _composite_on_white(img: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours; compositing on white is what a viewer shows.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, 16-bit/float greyscale rescaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - np.float32(lo)) / np.float32(hi - lo) * np.float32(255) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def check_image_budget(height: int, width: int, cfg: PreprocessConfig | None, *,
                       max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> None:
    """Refuse an image whose decoded or resized size is over budget, before a single pixel is allocated.

    Both sizes matter: ``width x height`` bounds the decode, and the resize (shorter side to the contract's
    size) bounds the float32 work that follows, which explodes for thin images of either orientation.

    Raises:
        ImageTooLargeError: naming the image size, the size it would reach and the limit.
        ImageDecodeError: an image with a zero-length side.
    """
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, "
                                 f"over the decoded-pixel limit of {max_pixels}")
    if cfg is None:
        return
    out_h, out_w = resize_size(height, width, cfg)
    if out_h * out_w > max_resized_pixels:
        raise ImageTooLargeError(f"image is {width}x{height}: preprocessing ({cfg.mode}) would resize it to "
                                 f"{out_w}x{out_h} = {out_h * out_w} pixels, over the limit of "
                                 f"{max_resized_pixels} (aspect ratio too extreme)")


#: What Pillow's format plugins raise on malformed files besides OSError (a mutated TIFF raises TypeError or
#: KeyError, a GIF IndexError, struct.error from header parsing): all mean "not a decodable image".
DECODER_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError,
                   IndexError, ZeroDivisionError, struct.error)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def decode_error_reason(err: BaseException) -> str:
    """A decoder's message fit for a user: no ``<_io.BytesIO object at 0x...>`` (memory addresses) in it."""
    text = " ".join(_OBJECT_REPR.sub("", str(err)).split())
    return text or type(err).__name__


def _open(source: bytes | str | Path | BinaryIO) -> BinaryIO:
    try:
        return io.BytesIO(source) if isinstance(source, bytes) else \
            open(source, "rb") if isinstance(source, (str, Path)) else source
    except OSError as err:
        raise ImageDecodeError(f"cannot open image {source}: {err}") from err


def _reduced_request(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    # The smallest (width, height) worth decoding: REDUCING_GAP times what the resize produces, capped by the image.
    out_h, out_w = resize_size(height, width, cfg)
    return min(width, math.ceil(REDUCING_GAP * out_w)), min(height, math.ceil(REDUCING_GAP * out_h))


def decoded_pixels(width: int, height: int, fmt: str | None, cfg: PreprocessConfig) -> int:
    """Pixels :func:`decode_image` (with ``fit=cfg``) will produce: JPEG decodes at 1/2, 1/4 or 1/8 scale.

    What decoding an image costs, known from its header: the serving engine budgets requests with it.
    """
    if fmt not in ("JPEG", "MPO") or width * height <= REDUCE_ABOVE_PIXELS:
        return width * height
    want_w, want_h = _reduced_request(width, height, cfg)
    scale = next(s for s in (8, 4, 2, 1) if width // s >= want_w and height // s >= want_h or s == 1)
    return math.ceil(width / scale) * math.ceil(height / scale)


def reduce_for_model(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Box-reduce an image by an integer factor while it stays ``REDUCING_GAP`` times above the resize target.

    A 8000 x 8000 picture for a 256 px contract becomes 533 x 533 in uint8 before the float32 resize, instead
    of a 768 MB float copy; images within a factor ``2 * REDUCING_GAP`` of the target, or of at most
    :data:`REDUCE_ABOVE_PIXELS`, are returned unchanged.
    """
    if img.width * img.height <= REDUCE_ABOVE_PIXELS:
        return img
    want_w, want_h = _reduced_request(img.width, img.height, cfg)
    factor = int(min(img.width / want_w, img.height / want_h))
    return img.reduce(factor) if factor >= 2 else img


def decode_image(source: bytes | str | Path | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 fit: PreprocessConfig | None = None,
                 max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> Image.Image:
    """Decode an image to RGB, applying EXIF orientation and the first frame of animations.

    Args:
        source: encoded bytes, a path or an open binary file.
        max_pixels: decoded-pixel limit, checked on the header before decoding.
        fit: the contract the image is decoded for: its resized size is checked against ``max_resized_pixels``
            before decoding; images over :data:`REDUCE_ABOVE_PIXELS` and far larger than the model needs are
            decoded at a reduced scale (JPEG draft mode) or box-reduced (:func:`reduce_for_model`).
        max_resized_pixels: limit on the resize output (only with ``fit``).

    Raises:
        ImageTooLargeError: over a pixel limit (a subclass of ImageDecodeError).
        ImageDecodeError: not an image, unsupported format, truncated data.
    """
    handle = _open(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(handle)
            if img.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {img.format}")
            width, height = img.size
            check_image_budget(height, width, fit, max_pixels=max_pixels, max_resized_pixels=max_resized_pixels)
            if getattr(img, "is_animated", False):  # not n_frames: counting walks every frame of the file
                img.seek(0)
            if fit is not None and img.format in ("JPEG", "MPO") and width * height > REDUCE_ABOVE_PIXELS:
                img.draft(None, _reduced_request(width, height, fit))  # DCT scaling: 1/2, 1/4 or 1/8 decode
            img.load()
            img = to_rgb(ImageOps.exif_transpose(img) or img)
            return img if fit is None else reduce_for_model(img, fit)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(f"image is over the decoded-pixel limit (decompression bomb guard): {err}") from err
    except MemoryError as err:
        raise ImageTooLargeError("image is too large to decode in the memory available") from err
    except DECODER_ERRORS as err:
        raise ImageDecodeError(f"not a decodable image: {decode_error_reason(err)}") from err
    finally:
        if isinstance(source, (str, Path)):
            handle.close()


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of the centre crop of side ``size``.

    torchvision's CenterCrop rounding (round half to even), so crops match the DINOv2 eval transform.
    """
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def output_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Final ``(H, W)`` of an image of the given size after preprocessing."""
    if cfg.mode in ("center_crop", "resize"):
        return cfg.size, cfg.size
    scale = cfg.size / min(height, width)
    p = cfg.patch_size
    return (max(p, round(height * scale / p) * p), max(p, round(width * scale / p) * p))


def resize_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """``(H, W)`` the resize step produces (before the centre crop of ``center_crop``)."""
    if cfg.mode == "resize":
        return cfg.size, cfg.size
    if cfg.mode == "patch_multiple":
        return output_size(height, width, cfg)
    short = cfg.resize_size or cfg.size
    scale = short / min(height, width)
    # Shorter side exactly ``short``; longer side rounded down like torchvision's Resize(int).
    if height <= width:
        return short, max(short, int(width * scale))
    return max(short, int(height * scale)), short


def num_patches(height: int, width: int, cfg: PreprocessConfig) -> int:
    """Patch tokens the backbone will see for an input of this size."""
    h, w = output_size(height, width, cfg)
    return math.prod((h // cfg.patch_size, w // cfg.patch_size))
