"""Preprocessing: decoding edge cases and PIL path == tensor path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.core.errors import ImageDecodeError, ImageTooLargeError
from dinoforge.core.preprocess import (
    PreprocessConfig,
    decode_image,
    output_size,
    pil_to_uint8,
    preprocess_image,
    preprocess_tensor,
)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("cfg", [
    PreprocessConfig(),
    PreprocessConfig(mode="resize", size=28),
    PreprocessConfig(mode="patch_multiple", size=98, patch_size=14),
    PreprocessConfig(mode="center_crop", size=56, resize_size=64, interpolation="bilinear"),
])
def test_pil_path_equals_tensor_path(sample_images_dir: Path, cfg: PreprocessConfig) -> None:
    for path in sorted(sample_images_dir.glob("*.png"))[::9]:
        img = decode_image(path)
        from_pil = preprocess_image(img, cfg)
        from_tensor = preprocess_tensor(torch.from_numpy(np.array(img)).permute(2, 0, 1), cfg)
        assert torch.equal(from_pil, from_tensor)
        assert tuple(from_pil.shape[-2:]) == output_size(img.height, img.width, cfg)


def test_batched_tensor_path_equals_single() -> None:
    x = torch.randint(0, 256, (4, 3, 40, 50), dtype=torch.uint8)
    cfg = PreprocessConfig(size=28, resize_size=32)
    batched = preprocess_tensor(x, cfg)
    assert torch.allclose(batched, torch.stack([preprocess_tensor(i, cfg) for i in x]), atol=1e-6)


def test_patch_multiple_never_asserts() -> None:
    cfg = PreprocessConfig(mode="patch_multiple", size=224, patch_size=14)
    for h, w in [(1, 1), (13, 500), (224, 225), (1000, 37)]:
        oh, ow = output_size(h, w, cfg)
        assert oh % 14 == 0 and ow % 14 == 0 and oh >= 14 and ow >= 14
        assert preprocess_tensor(torch.zeros(3, h, w, dtype=torch.uint8), cfg).shape == (3, oh, ow)


def test_center_crop_matches_torchvision_geometry() -> None:
    import skimage.data
    from torchvision.transforms import v2

    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).contiguous()[:, :400, :]  # odd crop offset
    cfg = PreprocessConfig(size=224, resize_size=256)
    ref = v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                      v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(cfg.mean, cfg.std)])(img)
    ours = preprocess_tensor(img, cfg)
    # Same geometry; torchvision resizes in uint8 (rounding between its two passes), we resize in float.
    grey_levels = (ours - ref).abs() * min(cfg.std) * 255
    assert ours.shape == ref.shape
    assert grey_levels.mean().item() < 0.5 and grey_levels.max().item() < 8


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(_encode(img, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif))
    assert out.size == (10, 30)


def test_gif_and_webp_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((0, 0))[0] > 200
    assert decode_image(_encode(frames[1], "WEBP", lossless=True)).getpixel((0, 0)) == (0, 0, 255)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` but carries almost no pixel data (a decompression bomb probe)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def test_bad_inputs_raise_image_decode_error(sample_images_dir: Path) -> None:
    jpeg = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(jpeg[: len(jpeg) // 2])  # truncated JPEG
    with pytest.raises(ImageDecodeError):
        decode_image(b"")
    with pytest.raises(ImageDecodeError):
        decode_image(b"%PDF-1.4 not an image")
    with pytest.raises(ImageTooLargeError, match="decoded-pixel limit"):
        decode_image(_png_header_only(40000, 40000))
    with pytest.raises(ImageTooLargeError, match="decoded-pixel limit"):
        decode_image(_png_header_only(5000, 5000), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="cannot open"):
        decode_image(sample_images_dir / "missing.png")


def test_pil_to_uint8_layout() -> None:
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    t = pil_to_uint8(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.uint8 and t[:, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("mode, size, patch, hint", [
    ("resize", 30, 7, "use 28 or 35"), ("center_crop", 230, 14, "use 224 or 238"), ("resize", 5, 7, "use 7)"),
])
def test_a_fixed_size_that_is_not_a_patch_multiple_is_rejected(mode: str, size: int, patch: int, hint: str) -> None:
    # the patch embedding would floor the grid and silently drop the last pixel rows and columns
    with pytest.raises(ValueError, match=f"size {size} is not a multiple of patch_size {patch}") as err:
        PreprocessConfig(mode=mode, size=size, resize_size=None, patch_size=patch)
    assert hint in str(err.value)
    # patch_multiple rounds every side itself, so any size is fine there
    assert output_size(30, 45, PreprocessConfig(mode="patch_multiple", size=size, patch_size=patch))[0] % patch == 0
