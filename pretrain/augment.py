"""DINOv2 multi-crop augmentation, vectorised over a batch and driven by explicit random numbers.

The official recipe (torchvision, one PIL image at a time) per image:

* global crop 1: RandomResizedCrop(G, scale 0.32-1, bicubic) -> flip -> colour jitter (0.4, 0.4, 0.2, 0.1;
  p 0.8) -> grayscale (p 0.2) -> Gaussian blur -> normalise;
* global crop 2: the same, then blur with another probability and solarize (threshold 128, p 0.2);
* ``N`` local crops: RandomResizedCrop(l, scale 0.05-0.32) -> flip -> jitter -> grayscale -> blur.

**Blur probabilities.** The official ``GaussianBlur`` wrapper is a ``RandomApply`` built with ``p = 1 - p``,
so the configured probabilities 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) are *applied* with
probability 0.0 / 0.9 / 0.5: the first global crop is never blurred and the second almost always is. The
published models were trained that way, so it is our default (``blur_as_intended: false``); set
``blur_as_intended: true`` to get the probabilities the paper and config describe (1.0 / 0.1 / 0.5).

**Randomness.** Nothing here touches a global RNG: every decision of every crop of every image is read from
a block of uniforms ``[n_images, n_crops, SLOTS]`` that the caller draws from a seeded generator (see
:mod:`.data`). The same numbers give the same crops in any process, worker, rank or resumed run.

**Numerics.** Geometry is done per image on float pixels (bicubic + antialias resize of the crop box, like
torchvision's tensor path); photometric ops then run on the whole crop group at once in float ``[0, 1]``
with per-image parameters. Results match torchvision's float-tensor semantics, not the PIL uint8 rounding
of the official pipeline (never bit-identical to it, by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.preprocess import IMAGENET_MEAN, IMAGENET_STD

#: Uniform numbers reserved per crop (22 for the crop box, 14 for flip/jitter/gray/blur/solarize).
SLOTS = 40
_BOX, _FLIP, _JIT_APPLY, _JIT_FACTORS, _JIT_ORDER, _GRAY, _BLUR, _SIGMA, _SOLAR = 0, 22, 23, 24, 28, 32, 33, 34, 35
_ATTEMPTS = 10
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


class CropsConfig(StrictModel):
    """Multi-crop parameters. Defaults are the official ViT-*/14 ones."""

    global_crops_size: int = Field(224, gt=0)
    local_crops_size: int = Field(98, gt=0)
    local_crops_number: int = Field(8, ge=0)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_kernel_size: int = Field(9, gt=0, description="Odd Gaussian kernel side (official 9 at 224 px).")
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_as_intended: bool = Field(False, description="Apply blur with p 1.0/0.1/0.5 (paper) instead of the "
                                   "official effective 0.0/0.9/0.5.")
    solarize_p: float = Field(0.2, ge=0, le=1)
    solarize_threshold: int = Field(128, ge=0, le=256)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _check(self) -> CropsConfig:
        for name in ("global_crops_scale", "local_crops_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if self.global_crops_scale[1] > 1 or self.local_crops_scale[1] > 1:
            raise ValueError("crop scales are fractions of the image area and cannot exceed 1")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        if self.blur_kernel_size // 2 >= min(self.global_crops_size, self.local_crops_size):
            raise ValueError(f"blur_kernel_size {self.blur_kernel_size} is too large for "
                             f"{self.local_crops_size} px crops (reflect padding must be < crop size)")
        return self

    @property
    def n_crops(self) -> int:
        """2 global + ``local_crops_number`` local crops."""
        return 2 + self.local_crops_number

    def blur_probabilities(self) -> tuple[float, float, float]:
        """Probability that the blur is *applied* to (global 1, global 2, local)."""
        return (1.0, 0.1, 0.5) if self.blur_as_intended else (0.0, 0.9, 0.5)


@dataclass(frozen=True)
class _CropKind:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize: bool


def crop_box(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, reading its random numbers from ``u``.

    Args:
        u: ``[22]`` uniforms in ``[0, 1)``: ten (area, log-ratio) attempts, then the two corner draws.

    Returns:
        ``(top, left, h, w)``; after ten failed attempts the central crop clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[20] * (height - h + 1))
            left = int(u[21] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resized_crops(images: list[torch.Tensor], u: np.ndarray, kind: _CropKind, cfg: CropsConfig) -> torch.Tensor:
    """Crop and resize every image. Returns float ``[n, 3, s, s]`` in ``[0, 1]``."""
    out = []
    for img, ui in zip(images, u, strict=True):
        _, height, width = img.shape
        top, left, h, w = crop_box(ui[_BOX:_FLIP], height, width, kind.scale, cfg.ratio)
        box = img[None, :, top:top + h, left:left + w].float()  # [1, C, h, w]
        if (h, w) != (kind.size, kind.size):
            box = F.interpolate(box, size=(kind.size, kind.size), mode="bicubic", antialias=True,
                                align_corners=False).clamp_(0, 255)
        out.append(box[0].expand(3, -1, -1) if box.shape[1] == 1 else box[0])
    return torch.stack(out) / 255.0


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` -> luma ``[n, 1, H, W]`` (ITU-R 601, as torchvision)."""
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 0)  # [6, n, 3, H, W]
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One ColorJitter op with per-image factors ``f [n]`` on ``x [n, 3, H, W]``."""
    f4 = f.view(-1, 1, 1, 1)
    if op == 0:  # brightness: blend with black
        return (x * f4).clamp_(0, 1)
    if op == 1:  # contrast: blend with the mean luma of the image
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f4 * x + (1 - f4) * mean).clamp_(0, 1)
    if op == 2:  # saturation: blend with the luma image
        return (f4 * x + (1 - f4) * _grayscale(x)).clamp_(0, 1)
    hsv = _rgb_to_hsv(x)  # hue: rotate the hue channel
    hsv[:, 0] = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def _color_jitter(x: torch.Tensor, u: np.ndarray, cfg: CropsConfig, grey: bool) -> torch.Tensor:
    """RandomApply(ColorJitter, p) with a random op order per image.

    On grey images saturation and hue are identities (the luma of a grey pixel is itself, its hue
    rotation does nothing), so ``grey`` skips them; their random numbers are still reserved, so the
    other draws do not move.
    """
    b, c, s, hue = cfg.color_jitter
    lows = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue])
    highs = np.array([1 + b, 1 + c, 1 + s, hue])
    factors = torch.from_numpy(lows + (highs - lows) * u[:, _JIT_FACTORS:_JIT_ORDER]).float()  # [n, 4]
    order = np.argsort(u[:, _JIT_ORDER:_GRAY], axis=1, kind="stable")  # [n, 4] a random permutation each
    apply = u[:, _JIT_APPLY] < cfg.color_jitter_p
    enabled = (highs - lows) > 0
    if grey:
        enabled[2:] = False
    for pos in range(4):
        for op in range(4):
            rows = np.nonzero(apply & (order[:, pos] == op))[0]
            if rows.size and enabled[op]:
                idx = torch.from_numpy(rows)
                x[idx] = _jitter_op(x[idx], op, factors[idx, op])
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding, one sigma per image. ``x [n, 3, H, W]``."""
    n, ch, hgt, wid = x.shape
    half = ksize // 2
    grid = torch.linspace(-half, half, ksize)
    kernel = torch.exp(-0.5 * (grid[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [n, k]
    kernel = kernel.repeat_interleave(ch, 0)  # [n*3, k]
    flat = F.pad(x.reshape(1, n * ch, hgt, wid), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * ch)  # vertical
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * ch)  # horizontal
    return flat.reshape(n, ch, hgt, wid)


def _photometric(x: torch.Tensor, u: np.ndarray, kind: _CropKind, cfg: CropsConfig, grey: bool) -> torch.Tensor:
    """Flip, jitter, grayscale, blur, solarize on ``x [n, 3, s, s]`` in ``[0, 1]``."""
    flip = torch.from_numpy(u[:, _FLIP] < cfg.flip_p)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = _color_jitter(x, u, cfg, grey)
    gray = torch.from_numpy(u[:, _GRAY] < cfg.grayscale_p).view(-1, 1, 1, 1)
    x = torch.where(gray, _grayscale(x).expand_as(x), x)
    blur = np.nonzero(u[:, _BLUR] < kind.blur_p)[0]
    if blur.size:
        lo, hi = cfg.blur_sigma
        sigma = torch.from_numpy(lo + (hi - lo) * u[blur, _SIGMA]).float()
        idx = torch.from_numpy(blur)
        x[idx] = _gaussian_blur(x[idx], sigma, cfg.blur_kernel_size)
    if kind.solarize:
        sol = torch.from_numpy(u[:, _SOLAR] < cfg.solarize_p).view(-1, 1, 1, 1)
        thr = cfg.solarize_threshold / 255.0
        x = torch.where(sol & (x >= thr), 1.0 - x, x)
    return x


class MultiCropAugmentation:
    """Turns uint8 images into DINOv2 global and local crops.

    Args:
        cfg: crop parameters.
    """

    def __init__(self, cfg: CropsConfig) -> None:
        self.cfg = cfg
        g1, g2, loc = cfg.blur_probabilities()
        self.kinds = [_CropKind(cfg.global_crops_size, cfg.global_crops_scale, g1, False),
                      _CropKind(cfg.global_crops_size, cfg.global_crops_scale, g2, True)]
        self.kinds += [_CropKind(cfg.local_crops_size, cfg.local_crops_scale, loc, False)] * cfg.local_crops_number
        self._mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    def __call__(self, images: list[torch.Tensor], uniforms: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a list of images.

        Args:
            images: ``n`` uint8 tensors ``[C, H, W]`` (C = 1 or 3; sizes may differ).
            uniforms: ``[n, n_crops, SLOTS]`` numbers in ``[0, 1)``.

        Returns:
            ``global_crops [2, n, 3, G, G]`` and ``local_crops [n_local, n, 3, l, l]`` (crop-major),
            normalised float32.
        """
        n = len(images)
        if uniforms.shape != (n, len(self.kinds), SLOTS):
            raise ValueError(f"uniforms must be [{n}, {len(self.kinds)}, {SLOTS}], got {list(uniforms.shape)}")
        grey = all(img.shape[0] == 1 for img in images)
        crops = []
        for c, kind in enumerate(self.kinds):
            x = _resized_crops(images, uniforms[:, c], kind, self.cfg)  # [n, 3, s, s]
            x = _photometric(x, uniforms[:, c], kind, self.cfg, grey)
            crops.append((x - self._mean) / self._std)
        global_crops = torch.stack(crops[:2])  # [2, n, 3, G, G]
        lsize = self.cfg.local_crops_size
        local_crops = torch.stack(crops[2:]) if len(crops) > 2 else torch.zeros(0, n, 3, lsize, lsize)
        return global_crops, local_crops
