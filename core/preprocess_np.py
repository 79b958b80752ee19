"""The preprocessing contract in numpy: the torch-free twin of :mod:`dinoforge.core.preprocess`.

The edge runtime (ONNX Runtime without torch) prepares images here. Every step reproduces the torch code it
stands for: the resize is the separable antialiased filter of ``torch.nn.functional.interpolate(...,
antialias=True)`` (bicubic with ``a = -0.5``, or the triangle filter for bilinear; the same weights in both
directions, so up- and down-sampling agree), ``nearest`` picks ``floor(i * in / out)`` like torch, the crop
and the normalisation are the same arithmetic in float32. ``tests/core/test_preprocess_np.py`` holds both
implementations equal on real photos (max difference ~1e-4 of a pixel level before normalisation).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from dinoforge.core.image_contract import (DEFAULT_MAX_RESIZED_PIXELS, PreprocessConfig, check_image_budget,
                                           crop_offsets, resize_size, to_rgb)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 ``[H, W, 3]`` (the camera layout, NHWC without the batch axis)."""
    return np.asarray(to_rgb(img), dtype=np.uint8)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    # Keys' cubic convolution kernel; torch's antialiased bicubic (like Pillow) uses a = -0.5.
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


@functools.lru_cache(maxsize=64)
def _aa_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out, in]`` float32 weights of torch's antialiased 1-D resample (``align_corners=False``).

    Output pixel ``i`` is centred at ``scale * (i + 0.5)`` in input coordinates; when shrinking, the kernel is
    stretched by ``scale`` (that is the antialiasing); taps outside the image are dropped and the remaining
    weights renormalised to sum to one, as torch computes its index ranges. The arithmetic is float32 like
    torch's on float images: float64 weights would drift ~4e-3 of a pixel level away from it.
    """
    kernel, half = (_cubic, 2.0) if mode == "bicubic" else (_triangle, 1.0)
    f32 = np.float32
    scale = f32(in_size / out_size)
    support = f32(half) * scale if scale >= 1.0 else f32(half)
    inv = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        center = scale * f32(i + 0.5)
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), in_size)
        taps = kernel((np.arange(lo, hi, dtype=np.float32) - center + f32(0.5)) * inv).astype(np.float32)
        total = taps.sum(dtype=np.float32)
        weights[i, lo:hi] = taps / total if total != 0 else taps
    weights.setflags(write=False)  # cached and shared: nobody may change it
    return weights


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    # torch's legacy "nearest": source = floor(i * scale) with a float32 scale, capped at the last pixel.
    scale = np.float32(in_size / out_size)
    return np.minimum((np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize float ``[H, W, C]`` pixels in ``[0, 255]`` to ``size = (H', W')``, clamped to ``[0, 255]``.

    Returns float32 ``[H', W', C]`` (the input itself when the size already matches).
    """
    h, w = x.shape[:2]
    if (h, w) == tuple(size):
        return x
    if mode == "nearest":
        return x[_nearest_index(h, size[0])][:, _nearest_index(w, size[1])].astype(np.float32)
    rows, cols = _aa_weights(h, size[0], mode), _aa_weights(w, size[1], mode)
    out = np.einsum("ij,jkc->ikc", rows, x.astype(np.float32), optimize=True)  # [H', W, C]
    out = np.einsum("kl,ilc->ikc", cols, out, optimize=True)  # [H', W', C]
    # Bicubic overshoots; clamp to the pixel range as an 8-bit image would be (as the torch path does).
    return np.clip(out, 0.0, 255.0, out=out)


def normalize(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Pixel values in ``[0, 255]`` (channel axis last) -> ``(x / 255 - mean) / std`` in float32."""
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return (x.astype(np.float32) / np.float32(255.0) - mean) / std


def geometry(pixels: np.ndarray, cfg: PreprocessConfig, *,
             max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> np.ndarray:
    """Resize and crop uint8 ``[H, W, 3]`` pixels by the contract: float32 ``[H', W', 3]`` in ``[0, 255]``.

    Raises:
        ImageTooLargeError: the resize would exceed ``max_resized_pixels`` (a thin image).
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"expected [H, W, 3] pixels, got {list(pixels.shape)}")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    h, w = pixels.shape[:2]
    check_image_budget(h, w, cfg, max_pixels=h * w, max_resized_pixels=max_resized_pixels)
    out = resize(pixels.astype(np.float32), resize_size(h, w, cfg), cfg.interpolation)
    if cfg.mode == "center_crop":
        top, left = crop_offsets(out.shape[0], out.shape[1], cfg.size)
        out = out[top:top + cfg.size, left:left + cfg.size]
    return out


def preprocess_array(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> normalised float32 ``[3, H', W']`` (what ``preprocess_tensor`` returns)."""
    return np.ascontiguousarray(normalize(geometry(pixels, cfg), cfg).transpose(2, 0, 1))


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """PIL image -> normalised float32 ``[3, H', W']``."""
    return preprocess_array(pil_to_array(img), cfg)


def pixels_for_graph(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """PIL image -> uint8 ``[H', W', 3]``: resized and cropped, not normalised (graphs that take uint8 pixels).

    The float resize is rounded to the nearest level, as a camera or a JPEG decoder hands over pixels.
    """
    return np.round(geometry(pil_to_array(img), cfg)).astype(np.uint8)


__all__ = ["geometry", "normalize", "pil_to_array", "pixels_for_graph", "preprocess_array",
           "preprocess_image", "resize"]
