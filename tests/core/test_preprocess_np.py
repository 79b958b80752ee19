"""The numpy preprocessing (edge runtime) equals the torch contract on real images, in every mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinoforge.core import preprocess_np
from dinoforge.core.preprocess import PreprocessConfig, decode_image, pil_to_uint8, preprocess_image, preprocess_tensor

CONTRACTS = {
    "dinov2-eval": PreprocessConfig(),  # resize 256, centre crop 224, bicubic
    "resize-up": PreprocessConfig(mode="resize", size=224, resize_size=None),  # 32 px photos grow 7x
    "patch-multiple": PreprocessConfig(mode="patch_multiple", size=98, patch_size=14, interpolation="bilinear"),
    "nearest-small": PreprocessConfig(mode="center_crop", size=56, resize_size=64, interpolation="nearest"),
}
PHOTO_DIRS = (Path("/usr/share/backgrounds/gnome"), Path("/usr/share/wallpapers"))


def _large_photo() -> Path | None:
    for root in PHOTO_DIRS:
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if found:
            return found[0]
    return None


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_numpy_equals_torch_on_real_images(sample_images_dir: Path, name: str) -> None:
    cfg = CONTRACTS[name]
    files = sorted(sample_images_dir.glob("imagenet_*.jpg"))[::4] + sorted(sample_images_dir.glob("*.png"))[::7]
    for path in files:  # ImageNet photos (JPEG), CIFAR-10/100, MNIST, Fashion-MNIST samples (PNG)
        img = decode_image(path)
        want = preprocess_image(img, cfg).numpy()  # [3, H, W]
        got = preprocess_np.preprocess_image(img, cfg)
        assert got.dtype == np.float32 and got.shape == want.shape, path.name
        # float32 reassociation only: ~1e-4 of a pixel level, i.e. < 2e-5 after dividing by 255 * std
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"{name} {path.name}")


def test_numpy_equals_torch_on_a_large_photo() -> None:
    path = _large_photo()
    if path is None:
        pytest.skip("no Debian wallpaper package installed (make test installs them)")
    cfg = PreprocessConfig()
    img = decode_image(path, fit=cfg)  # reduced-scale decoding, as serving does
    np.testing.assert_allclose(preprocess_np.preprocess_image(img, cfg), preprocess_image(img, cfg).numpy(),
                               rtol=0, atol=2e-5)


def test_uint8_pixels_match_the_torch_geometry(sample_images_dir: Path) -> None:
    """``pixels_for_graph`` (uint8 NHWC for graphs that normalise) = the torch geometry, rounded."""
    cfg = PreprocessConfig(mode="center_crop", size=56, resize_size=64)
    raw = cfg.model_copy(update={"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3})
    for path in sorted(sample_images_dir.glob("imagenet_*.png"))[:5]:
        img = decode_image(path)
        want = preprocess_tensor(pil_to_uint8(img), raw).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        got = preprocess_np.pixels_for_graph(img, cfg)
        assert got.dtype == np.uint8 and got.shape == (56, 56, 3)
        # a float value within 1e-4 of a .5 boundary may round the other way: at most one level, rarely
        diff = np.abs(got.astype(np.int16) - want.numpy().astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, path.name
