"""Image folders built from the real sample images, shared by the data, loader and evaluation tests."""

from __future__ import annotations

import shutil
from pathlib import Path

#: Sample-image groups used as classes (file prefixes in the foolbox ``data/`` folder).
GROUPS = ("cifar10", "imagenet", "mnist")


def make_labelled_folder(sample_images_dir: Path, root: Path, per_class: int = 4) -> dict[str, list[str]]:
    """Copy real images into ``root/<group>/`` class folders; returns the relative paths per class."""
    made: dict[str, list[str]] = {}
    for group in GROUPS:
        files = sorted(sample_images_dir.glob(f"{group}_*"))[:per_class]
        (root / group).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, root / group / f.name)
        made[group] = [f"{group}/{f.name}" for f in files]
    return made


def write_corrupt_jpeg(path: Path, sample_images_dir: Path) -> None:
    """A real JPEG cut short: the header parses, the data does not."""
    data = next(sample_images_dir.glob("imagenet_*.jpg")).read_bytes()
    path.write_bytes(data[: len(data) // 3])
