"""One preprocessing contract, used identically by evaluation, export parity checks and serving.

Pipeline: decode (any common format, first frame, EXIF orientation, any mode to RGB) -> uint8 ``[3, H, W]``
tensor -> resize -> crop -> normalise. The PIL entry point converts to a tensor first and then runs the very
same tensor code, so both paths give identical tensors by construction (a test checks it).

Modes (:class:`PreprocessConfig.mode`):

* ``center_crop``: resize the shorter side to ``resize_size``, centre-crop ``size x size`` (DINOv2 eval).
* ``resize``: resize to ``size x size`` ignoring aspect (small images such as Fashion-MNIST).
* ``patch_multiple``: resize the shorter side to ``size`` keeping aspect, each side rounded to the nearest
  multiple of ``patch_size`` (at least one patch) — any image size works, never an assertion error.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import torch
import torch.nn.functional as F
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
        arr = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32").copy())
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else torch.zeros_like(arr)
        return Image.fromarray(arr.round().to(torch.uint8).numpy(), mode="L").convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def decode_image(source: bytes | str | Path | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image to RGB, applying EXIF orientation and the first frame of animations.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` decoded pixels (a subclass of ImageDecodeError).
        ImageDecodeError: not an image, unsupported format, truncated data.
    """
    try:
        handle: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else \
            open(source, "rb") if isinstance(source, (str, Path)) else source  # noqa: SIM115
    except OSError as err:
        raise ImageDecodeError(f"cannot open image {source}: {err}") from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(handle)
            if img.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {img.format}")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, "
                                       f"over the decoded-pixel limit of {max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(f"image is over the decoded-pixel limit (decompression bomb guard): {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"not a decodable image: {err}") from err
    finally:
        if isinstance(source, (str, Path)):
            handle.close()


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 ``[3, H, W]``."""
    import numpy as np

    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- geometry
def output_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Final ``(H, W)`` of an image of the given size after preprocessing."""
    if cfg.mode in ("center_crop", "resize"):
        return cfg.size, cfg.size
    scale = cfg.size / min(height, width)
    p = cfg.patch_size
    return (max(p, round(height * scale / p) * p), max(p, round(width * scale / p) * p))


def _resize_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
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


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    kwargs = {"antialias": True} if mode in ("bicubic", "bilinear") else {}
    align = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    out = F.interpolate(x, size=size, mode=mode, **kwargs, **align)
    # Bicubic overshoots; clamp to the pixel range as an 8-bit image would be.
    return out.clamp_(0.0, 255.0)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    # torchvision's CenterCrop rounding (round half to even), so crops match the DINOv2 eval transform.
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Pixel values in ``[0, 255]`` -> normalised float32 (``(x / 255 - mean) / std``), channel dim -3."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def preprocess_tensor(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Preprocess uint8 (or float in ``[0, 255]``) images.

    Args:
        x: ``[3, H, W]`` or ``[B, 3, H, W]``; a single channel is repeated to RGB.
        cfg: the contract.

    Returns:
        float32 ``[3, H', W']`` or ``[B, 3, H', W']`` with ``(H', W') = output_size(H, W, cfg)``.
    """
    single = x.dim() == 3
    batch = x.unsqueeze(0) if single else x
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W] pixels, got {list(x.shape)}")
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    h, w = batch.shape[-2:]
    out = _resize(batch.float(), _resize_size(h, w, cfg), cfg.interpolation)
    if cfg.mode == "center_crop":
        out = _center_crop(out, cfg.size)
    out = normalize(out, cfg)
    return out[0] if single else out


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """PIL image -> normalised float32 ``[3, H', W']`` (the tensor path, after conversion)."""
    return preprocess_tensor(pil_to_uint8(img), cfg)


def num_patches(height: int, width: int, cfg: PreprocessConfig) -> int:
    """Patch tokens the backbone will see for an input of this size."""
    h, w = output_size(height, width, cfg)
    return math.prod((h // cfg.patch_size, w // cfg.patch_size))
