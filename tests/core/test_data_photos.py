"""The installed-photos collection (``dinoforge photos`` / ``photos:``), Tux Paint stamps, ``+`` joins, repeats."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.data import open_source
from dinoforge.core.data.photos import Origin, PhotoFile, _largest_variants, build_photos, find_installed_photos
from dinoforge.core.data.tuxpaint import EVAL_CATEGORIES
from dinoforge.core.errors import DataError


def _skimage_photos(n: int) -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(list(spec.submodule_search_locations)[0], "data")
    return [folder / name for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")[:n]]


def test_build_photos_writes_a_licensed_manifest_without_exact_duplicates(tmp_path: Path) -> None:
    real = _skimage_photos(3)
    copy = tmp_path / "copy_of_astronaut.png"
    shutil.copy(real[0], copy)
    tiny = tmp_path / "icon.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tiny)
    files = [PhotoFile(p, "scikit-image", "BSD-3-Clause") for p in real]
    files += [PhotoFile(copy, "elsewhere", "MIT"), PhotoFile(tiny, "elsewhere", "MIT")]
    report = build_photos(tmp_path / "photos", short_side=64, files=files)
    assert report["images"] == 3
    assert report["dropped"] == {"exact_duplicate": 1, "too_small": 1, "unreadable": 0}
    table = pd.read_csv(tmp_path / "photos" / "manifest.csv")
    assert list(table["source"]) == ["scikit-image"] * 3 and set(table["licence"]) == {"BSD-3-Clause"}
    assert list(table["origin_path"]) == [str(p) for p in real]
    source = open_source(f"photos:{tmp_path / 'photos'}")
    assert len(source) == 3 and source.spec.startswith("photos:")
    sizes = [source[i].image.size for i in range(3)]
    assert all(min(s) == 64 for s in sizes)  # shrunk to the short side, aspect kept
    assert sizes[0] == (64, 64) and Image.open(real[1]).size[0] > Image.open(real[1]).size[1] and sizes[1][0] > 64


def test_missing_collection_and_empty_origins_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dinoforge photos"):
        open_source(f"photos:{tmp_path}")
    with pytest.raises(DataError, match="no installed photos"):
        build_photos(tmp_path / "out", files=[])
    assert find_installed_photos([Origin("none", "MIT", lambda: [])]) == []


def test_wallpaper_resolution_variants_keep_the_largest() -> None:
    paths = [Path("/w/Elephants.jpg"), Path("/w/Elephants_3840x2160.jpg"), Path("/w/Elephants_5640x3172.jpg"),
             Path("/w/Flow.png")]
    kept = _largest_variants(paths, key=lambda p: str(p.parent / p.stem.split("_")[0]))
    assert kept == [Path("/w/Elephants_5640x3172.jpg"), Path("/w/Flow.png")]


def test_tuxpaint_eval_is_the_422_stamps_of_seven_categories_on_white() -> None:
    source = open_source("tuxpaint:eval")
    assert len(source) == 422 and source.classes == sorted(EVAL_CATEGORIES)
    assert np.bincount(source.labels).tolist() == [146, 19, 67, 34, 39, 79, 38]
    image = np.asarray(source[0].image)
    assert image.shape == (224, 224, 3) and (image[0, 0] == 255).all()  # composited on white
    other = open_source("tuxpaint:other")
    assert not set(other.classes) & set(EVAL_CATEGORIES) and len(other) > 0
    with pytest.raises(DataError, match="unknown split"):
        open_source("tuxpaint:train")


def test_join_and_repeat_selections(tmp_path: Path, fmnist_dir: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    joined = open_source(f"folder:{folder}[*2]+fmnist:train[:4]")  # fmnist_dir: the Debian files are there
    assert len(joined) == 3 * 2 + 4
    assert [joined.record(i).id for i in range(6)] == ["0.png", "1.png", "2.png"] * 2
    assert joined[6].image.size == (28, 28)
    with pytest.raises(DataError, match=r"\[\*N\]"):
        open_source(f"folder:{folder}[*x]")
    with pytest.raises(DataError, match="positive"):
        open_source(f"folder:{folder}[*0]")
