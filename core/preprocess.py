"""One preprocessing contract, used identically by evaluation, export parity checks and serving (torch).

Pipeline: decode (:func:`decode_image`, any common format, first frame, EXIF orientation, any mode to RGB) ->
uint8 ``[3, H, W]`` tensor -> resize -> crop -> normalise. The PIL entry point converts to a tensor first and
then runs the very same tensor code, so both paths give identical tensors by construction (a test checks it).

The contract itself (:class:`PreprocessConfig`), decoding and the geometry are torch-free and live in
:mod:`dinoforge.core.image_contract`; they are re-exported here so training code keeps one import. The numpy
twin of the pixel arithmetic below is :mod:`dinoforge.core.preprocess_np` (the torch-free edge runtime).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinoforge.core.image_contract import (DECODER_ERRORS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_RESIZED_PIXELS,
                                           IMAGENET_MEAN, IMAGENET_STD, REDUCE_ABOVE_PIXELS, REDUCING_GAP,
                                           SUPPORTED_FORMATS, PreprocessConfig, check_image_budget, crop_offsets,
                                           decode_error_reason, decode_image, decoded_pixels, num_patches,
                                           output_size, reduce_for_model, resize_size, to_rgb)

__all__ = ["DECODER_ERRORS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_RESIZED_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD",
           "REDUCE_ABOVE_PIXELS", "REDUCING_GAP", "SUPPORTED_FORMATS", "PreprocessConfig", "check_image_budget",
           "decode_error_reason", "decode_image", "decoded_pixels", "normalize", "num_patches", "output_size",
           "pil_to_uint8", "preprocess_image", "preprocess_tensor", "reduce_for_model", "to_rgb"]


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- geometry
def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    kwargs = {"antialias": True} if mode in ("bicubic", "bilinear") else {}
    align = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    out = F.interpolate(x, size=size, mode=mode, **kwargs, **align)
    # Bicubic overshoots; clamp to the pixel range as an 8-bit image would be.
    return out.clamp_(0.0, 255.0)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = crop_offsets(int(x.shape[-2]), int(x.shape[-1]), size)
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Pixel values in ``[0, 255]`` -> normalised float32 (``(x / 255 - mean) / std``), channel dim -3."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def preprocess_tensor(x: torch.Tensor, cfg: PreprocessConfig, *,
                      max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> torch.Tensor:
    """Preprocess uint8 (or float in ``[0, 255]``) images.

    Args:
        x: ``[3, H, W]`` or ``[B, 3, H, W]``; a single channel is repeated to RGB.
        cfg: the contract.
        max_resized_pixels: refuse (before allocating) an image the resize would blow up beyond this.

    Raises:
        ImageTooLargeError: the resized image would exceed ``max_resized_pixels`` (a thin image).

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
    check_image_budget(h, w, cfg, max_pixels=h * w, max_resized_pixels=max_resized_pixels)
    out = _resize(batch.float(), resize_size(h, w, cfg), cfg.interpolation)
    if cfg.mode == "center_crop":
        out = _center_crop(out, cfg.size)
    out = normalize(out, cfg)
    return out[0] if single else out


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """PIL image -> normalised float32 ``[3, H', W']`` (the tensor path, after conversion)."""
    return preprocess_tensor(pil_to_uint8(img), cfg)
