"""What counts as an original in the copy-detection pool: flat images are none, twins are one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from dinoforge.curate.copycalib import calibrate_dedup
from dinoforge.curate.photopool import photo_pool, twin_pairs

skimage = pytest.importorskip("skimage")


def _collection(root: Path, images: dict[str, Image.Image]) -> Path:
    rows = []
    for i, (name, image) in enumerate(images.items()):
        rel = f"images/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        rows.append({"path": rel, "id": f"test/{name}#{i}", "source": "scikit-image", "licence": "BSD-3",
                     "origin_path": name, "width": image.width, "height": image.height})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _photo(name: str) -> Image.Image:
    with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
        return im.convert("RGB").resize((160, 160))


def test_twins_share_a_group_and_a_side_and_flat_images_are_no_originals(tmp_path: Path) -> None:
    astronaut = _photo("astronaut.png")
    gradient = Image.fromarray(np.tile(np.linspace(120, 128, 160, dtype=np.uint8), (160, 1))).convert("RGB")
    images = {"astronaut": astronaut, "astronaut_mirror": ImageOps.mirror(astronaut),
              "astronaut_jpeg_like": astronaut.quantize(64).convert("RGB"), "chelsea": _photo("chelsea.png"),
              "coffee": _photo("coffee.png"), "gradient": gradient, "tiny": astronaut.resize((64, 64))}
    pool = {p.id.split("#")[0].split("/")[1]: p for p in photo_pool(_collection(tmp_path, images))}
    assert pool["gradient"].split == "flat" and pool["tiny"].split == "small"
    twins = [pool[n] for n in ("astronaut", "astronaut_mirror", "astronaut_jpeg_like")]
    assert len({p.group for p in twins}) == 1 and len({p.split for p in twins}) == 1
    assert twins[0].group == min(p.id for p in twins)
    assert len({pool["astronaut"].group, pool["chelsea"].group, pool["coffee"].group}) == 3


def test_twin_pairs_are_mirror_aware_and_contrast_free() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32)).astype(np.float32)
    b = 0.5 * a[:, ::-1] + 0.2  # mirrored, lower contrast, brighter: the same picture
    c = rng.random((32, 32)).astype(np.float32)
    assert twin_pairs(np.stack([a, b, c])) == [(0, 1)]


def test_calibration_counts_twins_as_one_original() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(20, 8))
    clean[1] = clean[0] + 0.01 * rng.normal(size=8)  # a twin of image 0
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    copies = clean[:, None, :] + 0.05 * rng.normal(size=(20, 2, 8))
    copies /= np.linalg.norm(copies, axis=2, keepdims=True)
    others = rng.normal(size=(30, 8))
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    apart = calibrate_dedup(clean, copies, others, [f"g{i}" for i in range(20)], min_precision=1.0)
    twins = calibrate_dedup(clean, copies, others, ["a", "a", *(f"g{i}" for i in range(18))], min_precision=1.0)
    assert twins["copy_recall_at_threshold"] == 1.0 and twins["precision_at_threshold"] == 1.0
    assert apart["threshold"] > twins["threshold"]  # as strangers, the twins force a higher threshold
