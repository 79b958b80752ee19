"""Hostile images against the shared preprocessing: thin images, huge images, and a job that meets them.

A thin image (1 x N or N x 1) is tiny on disk and in decoded pixels, but the resize scales its shorter side up
to the contract's size, so its float32 work grows with N times the square of that size. The budget is checked
on both the decoded and the resized size before anything is allocated, by one function in core that every
stage goes through (serving, extraction, curation's embed step, `index build`).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.core.errors import ImageTooLargeError
from dinoforge.core.extract import ExtractConfig, FeatureStore, run_extraction
from dinoforge.core.preprocess import (PreprocessConfig, check_image_budget, decode_image, pil_to_uint8,
                                       preprocess_image, preprocess_tensor)

CROP = PreprocessConfig(mode="center_crop", size=224, resize_size=256, patch_size=14)
PATCHES = PreprocessConfig(mode="patch_multiple", size=224, resize_size=None, patch_size=14)


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("cfg", [CROP, PATCHES], ids=["center_crop", "patch_multiple"])
@pytest.mark.parametrize("size", [(1, 100), (100, 1), (1, 100_000), (100_000, 1)], ids=str)
def test_thin_images_are_refused_before_any_allocation(cfg: PreprocessConfig, size: tuple[int, int]) -> None:
    width, height = size
    data = png(width, height)
    assert len(data) < 1000  # the attack: a few hundred bytes
    with pytest.raises(ImageTooLargeError, match="aspect ratio too extreme"):
        decode_image(data, fit=cfg)
    with pytest.raises(ImageTooLargeError, match="would resize it to"):
        check_image_budget(height, width, cfg)
    # the tensor path is guarded too (extraction and curation decode without knowing the contract)
    with pytest.raises(ImageTooLargeError):
        preprocess_tensor(torch.zeros(3, min(height, 100), min(width, 100), dtype=torch.uint8), cfg)


def test_moderate_panoramas_still_work() -> None:
    wide = Image.new("RGB", (3000, 100), (10, 20, 30))  # 30:1 -> 256 x 7680 resized: under the budget
    assert preprocess_image(wide, CROP).shape == (3, 224, 224)
    assert decode_image(png(3000, 100), fit=CROP).size == (3000, 100)


def test_decoded_budget_is_checked_on_the_header() -> None:
    with pytest.raises(ImageTooLargeError, match="decoded-pixel limit"):
        decode_image(png(2000, 2000), max_pixels=1_000_000, fit=CROP)


def test_huge_jpeg_is_decoded_at_reduced_scale_and_matches_full_decode() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((3200, 2400), Image.BICUBIC)  # smooth content, like a photo
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=92)
    reduced = decode_image(buf.getvalue(), fit=CROP)
    full = decode_image(buf.getvalue())
    # draft decodes at 1/4 scale (800 x 600 >= 2 x the 341 x 256 resize); never below REDUCING_GAP x target
    assert full.size == (3200, 2400) and reduced.size == (800, 600)
    a, b = preprocess_image(reduced, CROP), preprocess_image(full, CROP)
    assert float((a - b).abs().mean()) < 0.02  # normalised units (std ~ 0.22 of a 0..1 pixel)


def test_huge_png_is_box_reduced_before_the_float_resize() -> None:
    img = decode_image(png(4000, 3000), fit=CROP)
    assert img.size == (800, 600)  # reduce(5): still >= 2 x the 341 x 256 resize output
    assert torch.equal(pil_to_uint8(img)[:, 0, 0], torch.tensor([200, 30, 90], dtype=torch.uint8))
    assert decode_image(png(600, 500), fit=CROP).size == (600, 500)  # close to the target: untouched
    assert decode_image(png(2000, 1900), fit=CROP).size == (2000, 1900)  # ordinary photo sizes decode exactly


def test_extract_skips_and_records_thin_images_and_resumes(tiny_artifact: Path, sample_images_dir: Path,
                                                          tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    good = sorted(sample_images_dir.glob("*.png"))[:5]
    for f in good:
        shutil.copy(f, pool / f.name)
    (pool / "thin_wide.png").write_bytes(png(100_000, 1))
    (pool / "thin_tall.png").write_bytes(png(1, 100_000))
    cfg = ExtractConfig(model=str(tiny_artifact), input=str(pool), output=str(tmp_path / "out"), shard_size=3,
                        batch_size=2, num_workers=0, progress=False)
    result = run_extraction(cfg)
    assert result.complete and result.rows_now == len(good) and result.bad_now == 2
    store = FeatureStore(tmp_path / "out")
    assert store.table().to_pandas()["id"].tolist() == sorted(f.name for f in good)
    bad = store.bad().to_pandas().sort_values("id")
    assert bad["id"].tolist() == ["thin_tall.png", "thin_wide.png"]
    assert all("aspect ratio too extreme" in reason for reason in bad["reason"])
    again = run_extraction(cfg)  # a rerun does not trip on them again
    assert again.complete and again.rows_now == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_mutated_files_are_decode_errors_never_crashes(fmt: str) -> None:
    """Random byte flips and truncations of real files: a clean image or an ImageDecodeError, nothing else."""
    from dinoforge.core.errors import ImageDecodeError

    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    original = buf.getvalue()
    for trial in range(150):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(0, 256))
        if trial % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            img = decode_image(bytes(data), fit=CROP)
        except ImageDecodeError:
            continue
        assert img.mode == "RGB" and img.width > 0 and img.height > 0


def test_an_animation_of_many_frames_is_not_walked_frame_by_frame() -> None:
    frames = [Image.new("P", (1, 1), i % 256) for i in range(20_000)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=1, disposal=2)
    import time

    start = time.perf_counter()
    for _ in range(20):
        assert decode_image(buf.getvalue(), fit=CROP).size == (1, 1)
    assert time.perf_counter() - start < 0.5  # counting the frames took ~80 ms per decode
