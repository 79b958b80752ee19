"""Copy edits of the DISC21 family (and a few it does not list), each a seeded function ``PIL -> PIL``.

The copy-detection benchmark (``bench/bench_copydetect.py``) makes its queries with these edits and the copy
descriptor's projection (:mod:`.copyhead`) is trained on random compositions of them, with wider parameter
ranges. The families of :data:`UNSEEN` are never used in training: they measure how the descriptor does on
edits it was not trained for (perspective warps, vertical flips, pixelation, posterisation, caption bands).

Every edit draws all of its randomness from the ``numpy.random.Generator`` it is given, so a seed fixes a
query set. Overlays use PIL's default font (text) and the emoji/face icons of the Adwaita icon theme when it
is installed (drawn coloured shapes otherwise; :func:`emoji_source` says which).
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]
_ICON_ROOT = Path("/usr/share/icons/Adwaita")


def crop(im: Image.Image, rng: np.random.Generator, min_area: float = 0.5) -> Image.Image:
    """A crop keeping ``min_area``..0.95 of the area, aspect changed by up to 1.5x."""
    w, h = im.size
    area = rng.uniform(min_area, 0.95) * w * h
    aspect = np.exp(rng.uniform(-np.log(1.5), np.log(1.5))) * w / h
    cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(8, round(area / cw))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x0, y0, x0 + cw, y0 + ch))


def rescale(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Resize by 0.3..1.5 per side (aspect changed by up to 1.3x)."""
    f = rng.uniform(0.3, 1.5)
    a = np.exp(rng.uniform(-np.log(1.3), np.log(1.3)))
    size = (max(16, round(im.width * f * np.sqrt(a))), max(16, round(im.height * f / np.sqrt(a))))
    return im.resize(size, Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, rng: np.random.Generator, lo: int = 20, hi: int = 60) -> Image.Image:
    """JPEG re-encoding at quality ``lo..hi``."""
    buffer = io.BytesIO()
    im.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(lo, hi + 1)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of radius 0.5..2.5 % of the shorter side."""
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0.005, 0.025) * min(im.size)))


def jitter(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation by 0.5..1.6 each, and a hue rotation of up to 0.1 turn."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(rng.uniform(0.5, 1.6))
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-25, 25))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def grey(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Greyscale (kept as three channels)."""
    return ImageOps.grayscale(im).convert("RGB")


def rotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotation by 3..15 degrees either way; the canvas grows, corners filled black or white."""
    angle = rng.uniform(3, 15) * rng.choice([-1, 1])
    fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    return im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill)


def flip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Horizontal mirror."""
    return ImageOps.mirror(im)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def text(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to three lines of random text (PIL's default font, 6..14 % of the height) at random places."""
    im = im.convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        size = max(8, int(rng.uniform(0.06, 0.14) * im.height))
        font = ImageFont.load_default(size=size)
        letters = list(string.ascii_letters + string.digits + "  !?")
        words = "".join(rng.choice(letters, size=int(rng.integers(5, 20))))
        xy = (int(rng.uniform(-0.1, 0.7) * im.width), int(rng.uniform(0, 0.85) * im.height))
        draw.text(xy, words, fill=_colour(rng), font=font, stroke_width=int(rng.integers(0, 3)),
                  stroke_fill=_colour(rng))
    return im


@lru_cache(maxsize=1)
def _icons() -> tuple[Image.Image, ...]:
    """The installed emoji/face icons (RGBA), largest size first; empty when the theme is missing."""
    found = sorted(_ICON_ROOT.glob("*/legacy/face-*.png")) + sorted(_ICON_ROOT.glob("*/legacy/emoji-*.png"))
    by_name: dict[str, Path] = {}
    for path in found:  # the largest rendering of each icon
        best = by_name.get(path.name)
        if best is None or Image.open(path).width > Image.open(best).width:
            by_name[path.name] = path
    return tuple(Image.open(p).convert("RGBA") for _, p in sorted(by_name.items()))


def emoji_source() -> str:
    """Where emoji overlays come from on this machine."""
    return f"{len(_icons())} Adwaita face/emoji icons" if _icons() else "drawn shapes (no emoji icons installed)"


def _shape(side: int, rng: np.random.Generator) -> Image.Image:
    icon = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.ellipse((0, 0, side - 1, side - 1), fill=(*_colour(rng), 255), outline=(0, 0, 0, 255), width=2)
    draw.ellipse((side // 4, side // 3, side // 4 + side // 8, side // 3 + side // 8), fill=(0, 0, 0, 255))
    draw.arc((side // 4, side // 3, 3 * side // 4, 3 * side // 4), 20, 160, fill=(0, 0, 0, 255), width=3)
    return icon


def emoji(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to three emoji pasted at random places, each 10..35 % of the shorter side."""
    im = im.convert("RGB").copy()
    icons = _icons()
    for _ in range(int(rng.integers(1, 4))):
        side = max(8, int(rng.uniform(0.10, 0.35) * min(im.size)))
        icon = icons[int(rng.integers(len(icons)))].resize((side, side)) if icons else _shape(side, rng)
        xy = (int(rng.integers(-side // 4, im.width - side // 2)), int(rng.integers(-side // 4, im.height - side // 2)))
        im.paste(icon, xy, icon)
    return im


def pad(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Padding of 3..25 % per side in one random colour (a border or a letterbox)."""
    w, h = im.size
    left, top, right, bottom = (int(rng.uniform(0.03, 0.25) * s) for s in (w, h, w, h))
    return ImageOps.expand(im.convert("RGB"), (left, top, right, bottom), fill=_colour(rng))


def overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text or emoji."""
    return text(im, rng) if rng.random() < 0.5 else emoji(im, rng)


def crop_overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop down to 50 % area, then a text or emoji overlay."""
    return overlay(crop(im, rng), rng)


# ---- families the DISC21 list does not name (never used to train the descriptor)
def perspective(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A perspective warp moving each corner by up to 12 % of the side."""
    w, h = im.size
    d = rng.uniform(0, 0.12, size=8) * np.array([w, h] * 4)
    quad = (d[0], d[1], d[2], h - d[3], w - d[4], h - d[5], w - d[6], d[7])  # UL, LL, LR, UR
    return im.convert("RGB").transform((w, h), Image.Transform.QUAD, tuple(float(v) for v in quad),
                                       Image.Resampling.BILINEAR)


def vflip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Vertical flip."""
    return ImageOps.flip(im)


def pixelate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blocks of 1.5..4 % of the shorter side."""
    block = max(2, int(rng.uniform(0.015, 0.04) * min(im.size)))
    small = im.resize((max(1, im.width // block), max(1, im.height // block)), Image.Resampling.BILINEAR)
    return small.resize(im.size, Image.Resampling.NEAREST)


def posterize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Posterisation to 2..3 bits per channel, then sharpening."""
    return ImageOps.posterize(im.convert("RGB"), int(rng.integers(2, 4))).filter(ImageFilter.SHARPEN)


def caption(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A meme-style caption band (18..30 % of the height) above or below, with text in it."""
    im = im.convert("RGB")
    band = int(rng.uniform(0.18, 0.30) * im.height)
    top = rng.random() < 0.5
    out = ImageOps.expand(im, (0, band if top else 0, 0, 0 if top else band), fill=_colour(rng))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(8, int(band * 0.5)))
    y = int(band * 0.2) if top else im.height + int(band * 0.2)
    draw.text((int(0.05 * im.width), y), "".join(rng.choice(list(string.ascii_uppercase + " "), size=12)),
              fill=_colour(rng), font=font)
    return out


SINGLE: dict[str, Edit] = {"crop": crop, "rescale": rescale, "jpeg": jpeg, "blur": blur, "jitter": jitter,
                           "grey": grey, "rotate": rotate, "flip": flip, "text": text, "emoji": emoji,
                           "pad": pad}
UNSEEN: dict[str, Edit] = {"perspective": perspective, "vflip": vflip, "pixelate": pixelate,
                           "posterize": posterize, "caption": caption}


def combo(im: Image.Image, rng: np.random.Generator, count: int) -> Image.Image:
    """``count`` distinct single edits in random order."""
    names = rng.choice(sorted(SINGLE), size=count, replace=False)
    for name in names:
        im = SINGLE[str(name)](im, rng)
    return im


#: The query families of the benchmark: the DISC21 singles, crop + overlay, combinations, unseen edits.
FAMILIES: dict[str, Edit] = {**SINGLE, "crop+overlay": crop_overlay,
                             "combo2": lambda im, rng: combo(im, rng, 2),
                             "combo3": lambda im, rng: combo(im, rng, 3), **UNSEEN}


def apply(name: str, im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``FAMILIES[name]`` applied to an RGB image; the result is RGB and at least 16 px a side."""
    out = FAMILIES[name](im.convert("RGB"), rng).convert("RGB")
    if min(out.size) < 16:
        out = out.resize((max(16, out.width), max(16, out.height)))
    return out


def training_view(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A strong random augmentation for descriptor training: an optional crop harsher than the benchmark's
    (down to 35 % area), one to three listed edits in random order, sometimes a final rescale."""
    im = im.convert("RGB")
    if rng.random() < 0.7:
        im = crop(im, rng, min_area=0.35)
    for name in rng.choice(sorted(SINGLE), size=int(rng.integers(1, 4)), replace=False):
        im = SINGLE[str(name)](im, rng)
    return apply("rescale", im, rng) if rng.random() < 0.3 else im.convert("RGB")


__all__ = ["FAMILIES", "SINGLE", "UNSEEN", "apply", "combo", "emoji_source", "training_view"]
