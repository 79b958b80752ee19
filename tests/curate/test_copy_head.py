"""The copy descriptor's projection: trained on a tiny real photo collection, saved, loaded, calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.errors import CheckpointError
from dinoforge.curate.copycalib import calibrate_dedup
from dinoforge.curate.copyhead import train_head, whitening
from dinoforge.curate.copynet import CopyDescriptor, load_head, save_head
from dinoforge.curate.photopool import photo_pool

skimage = pytest.importorskip("skimage")
#: Colour photos of scikit-image's data folder (real, shipped by the package).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "color.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg", "phantom.png", "horse.png", "logo.png",
          "camera.png", "coins.png", "moon.png", "brick.png")


def tiny_photos(root: Path, names: tuple[str, ...] = PHOTOS, side: int = 192) -> Path:
    """A ``dinoforge photos``-style collection (manifest.csv + images) of real scikit-image photos, shrunk
    to ``side`` pixels on the longer side to keep tests fast."""
    data = Path(skimage.__file__).parent / "data"
    rows = []
    for i, name in enumerate(names):
        with Image.open(data / name) as im:
            image = im.convert("RGB")
        image.thumbnail((side, side))
        rel = f"images/scikit-image/{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, quality=95)
        rows.append({"path": rel, "id": f"scikit-image/{name}#{i}", "source": "scikit-image", "licence": "BSD-3",
                     "origin_path": str(data / name), "width": 512, "height": 512})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_whitening_decorrelates() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    mean, w = whitening(x, 4, shrink=0.0)
    z = (x - mean) @ w
    np.testing.assert_allclose(np.cov(z.T), np.eye(4), atol=1e-6)


@pytest.mark.parametrize("linkage", ["components", "kept"])
def test_dedup_calibration_separates_copies_from_distractors(linkage: str) -> None:
    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    clean = unit(rng.normal(size=(40, 16)))
    copies = unit(clean[:, None, :] + 0.1 * rng.normal(size=(40, 3, 16)))
    others = unit(rng.normal(size=(100, 16)))
    record = calibrate_dedup(clean, copies, others, [f"g{i}" for i in range(40)], min_precision=0.95,
                             linkage=linkage)  # type: ignore[arg-type]
    assert record["linkage"] == linkage
    assert record["precision_at_threshold"] >= 0.95 and record["copy_recall_at_threshold"] == 1.0
    curve = np.array(record["curve"])  # [thresholds, (t, recall, precision)]
    assert (np.diff(curve[:, 1]) <= 1e-9).all()  # recall falls as the threshold rises
    assert record["threshold"] == min(t for t, _, p in record["curve"] if p >= 0.95)


def test_train_head_on_real_photos(tmp_path: Path) -> None:
    photos = tiny_photos(tmp_path / "photos")
    out = tmp_path / "head.npz"
    record = train_head(photos, out, views=1, whiten_dim=24, dim=16, steps=30, batch=8, train_percent=100,
                        calibration_percent=30)
    mean, proj, meta = load_head(out)
    # at most 16 wide: the whitening keeps no more directions than the training views span
    assert proj.shape[0] == mean.size and 8 <= proj.shape[1] <= 16 and meta["threshold"] == record["threshold"]
    usable = [p for p in photo_pool(photos, train_percent=100) if p.split in ("train", "small")]  # not flat
    assert record["train_images"] + record["calibration_images"] == len(usable)
    assert record["calibration"] == "simulated dedup" and 0.0 <= record["copy_recall_at_threshold"] <= 1.0
    desc = CopyDescriptor(out)
    images = [p.load() for p in photo_pool(photos, train_percent=100)[:4]]
    z = desc(images + [im.resize((im.width // 2, im.height // 2)) for im in images])  # [8, 16]
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    sims = z[4:] @ z[:4].T
    assert (sims.argmax(axis=1) == np.arange(4)).all()  # a rescaled copy finds its original


def test_head_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        CopyDescriptor(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a numpy file")
    with pytest.raises(CheckpointError, match="not a head file"):
        load_head(tmp_path / "bad.npz")
    save_head(tmp_path / "odd.npz", np.zeros(4), np.zeros((4, 2)), {"threshold": 0.5, "size": 64, "linkage": "single"})
    with pytest.raises(CheckpointError, match="unknown linkage 'single'"):
        load_head(tmp_path / "odd.npz")


def test_copy_head_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dinoforge.core.cli import main

    assert main(["copy-head", "--photos", str(tmp_path / "none"), "--out", str(tmp_path / "h.npz")]) != 0
    assert "does not exist" in capsys.readouterr().err  # no collection manifest: one line, no traceback
    photos = tiny_photos(tmp_path / "photos", PHOTOS[:4])
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "h.npz"), "--min-precision", "1.5"]) != 0
    assert "--min-precision" in capsys.readouterr().err
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "h.npz"), "--size", "8"]) != 0
    assert "--size" in capsys.readouterr().err
    (tmp_path / "afile").write_text("a file, not a folder")
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "afile" / "h.npz")]) != 0
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path)]) != 0
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "h.npz").exists()
