"""The copy descriptor's projection: trained on a tiny real photo collection, saved, loaded, calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.errors import CheckpointError
from dinoforge.curate.copycalib import calibrate_dedup
from dinoforge.curate.copyhead import HeadSettings, cross_fit, fold_of, train_head, whitening
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
    settings = HeadSettings(whiten_dim=24, dim=16, steps=30, batch=8)
    record = train_head(photos, out, views=1, settings=settings, train_percent=100, folds=2)
    mean, proj, meta = load_head(out)
    # at most 16 wide: the whitening keeps no more directions than the training views span
    assert proj.shape[0] == mean.size and 8 <= proj.shape[1] <= 16 and meta["threshold"] == record["threshold"]
    pool = [p for p in photo_pool(photos, train_percent=100) if p.split in ("train", "small")]  # not flat
    originals = [p for p in pool if p.split == "train"]
    assert record["train_images"] == len(pool) and record["calibration_images"] == len(originals) >= 8
    assert sum(f["images"] for f in record["fold_calibrations"]) == len(originals) and record["folds"] == 2
    assert record["calibration"] == "cross-fitted simulated dedup" and 0.0 <= record["copy_recall_at_threshold"] <= 1.0
    desc = CopyDescriptor(out)
    images = [p.load() for p in photo_pool(photos, train_percent=100)[:4]]
    z = desc(images + [im.resize((im.width // 2, im.height // 2)) for im in images])  # [8, 16]
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    sims = z[4:] @ z[:4].T
    assert (sims.argmax(axis=1) == np.arange(4)).all()  # a rescaled copy finds its original


def test_cross_fit_sums_the_folds_and_never_calibrates_on_seen_photos(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The summed counts are the folds' counts, and each fold's head was fitted without that fold's photos."""
    photos = tiny_photos(tmp_path / "photos")
    pool = [p for p in photo_pool(photos, train_percent=100) if p.split in ("train", "small")]
    originals = np.array([i for i, p in enumerate(pool) if p.split == "train"])
    rng = np.random.default_rng(0)
    fit_x = rng.normal(size=(len(pool), 2, 12))  # [N, V+1, D_raw]
    cal_x = np.concatenate([fit_x[originals, :1], fit_x[originals, :1] + 0.05 * rng.normal(size=(originals.size, 3, 12))], 1)
    settings = HeadSettings(whiten_dim=8, dim=6, steps=5, batch=4)
    fitted: list[set[int]] = []  # the pool rows each fold's head was fitted on
    real_fit = HeadSettings.fit

    def spy(self: HeadSettings, views_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fitted.append({int(np.nonzero((fit_x[:, 0] == row).all(axis=1))[0][0]) for row in views_x[:, 0]})
        return real_fit(self, views_x)

    monkeypatch.setattr(HeadSettings, "fit", spy)
    counts, report = cross_fit(pool, originals, fit_x, cal_x, settings, 3, "kept")
    sizes = [f["images"] for f in report]
    folds = np.array([fold_of(pool[i], 3) for i in originals])
    assert sizes == [int((folds == f).sum()) for f in range(3)] and sum(sizes) == originals.size
    held = [set(originals[folds == f].tolist()) for f in range(3) if sizes[f]]
    assert len(fitted) == len(held) >= 2
    for rows, fold in zip(fitted, held, strict=True):
        assert rows == set(range(len(pool))) - fold  # every other photo, none of the fold's
    assert counts[:, 3].max() == originals.size * 3  # every fold's copies are due, once
    assert (counts[:, 1] <= counts[:, 2]).all() and (counts[:, 1] <= counts[:, 3]).all()


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
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "h.npz"), "--folds", "1"]) != 0
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "h.npz"), "--size", "8"]) != 0
    assert "--size" in capsys.readouterr().err
    two = tiny_photos(tmp_path / "two", PHOTOS[:2])  # at most two originals cannot fill four calibration folds
    assert main(["copy-head", "--photos", str(two), "--out", str(tmp_path / "h.npz")]) != 0
    assert "fewer than the 4 calibration folds" in capsys.readouterr().err
    (tmp_path / "afile").write_text("a file, not a folder")
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path / "afile" / "h.npz")]) != 0
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["copy-head", "--photos", str(photos), "--out", str(tmp_path)]) != 0
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "h.npz").exists()
