"""Real photos installed on this machine (Debian and PyPI packages), gathered into one training manifest.

The collection is built once by :func:`build_photos` (``dinoforge photos OUT``): every installed image of the
known origins (:data:`ORIGINS`) is decoded (alpha composited on white), exact duplicates are dropped (same
file bytes or same decoded pixels), wallpaper resolution variants are reduced to the largest one, and each
image is written shrunk to ``short_side`` pixels (random-resized crops of a 5120x2880 wallpaper need not
decode 15 megapixels per crop) as ``OUT/images/<origin>/<n>.jpg``. ``OUT/manifest.csv`` lists every file with
its origin, licence and original path; ``OUT/report.json`` counts what was kept and dropped.

Evaluation images are never part of it: the tuxpaint categories of the evaluation protocol
(:data:`~dinoforge.core.data.tuxpaint.EVAL_CATEGORIES`) are skipped here, and the curation stage's relative
deduplication (``curate/recipes/photos.yaml``) removes near-copies of every evaluation set from the
manifest before training. ``photos:OUT`` opens the manifest as a data source.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from dinoforge.core.data.folder import IMAGE_EXTENSIONS
from dinoforge.core.data.manifest import ManifestSource
from dinoforge.core.data.tuxpaint import EVAL_CATEGORIES, TUXPAINT_STAMPS
from dinoforge.core.errors import DataError, ImageDecodeError
from dinoforge.core.fileio import atomic_write_json, atomic_write_text, sha256_bytes
from dinoforge.core.preprocess import DEFAULT_MAX_PIXELS, decode_image

MANIFEST_NAME = "manifest.csv"
_VARIANT_SIZE = re.compile(r"[_-]?(\d{3,5})x(\d{3,5})$")


@dataclass(frozen=True)
class PhotoFile:
    """One installed image: where it is, which origin it belongs to, under which licence."""

    path: Path
    origin: str
    licence: str


@dataclass(frozen=True)
class Origin:
    """A family of installed images and how to find them."""

    name: str
    licence: str
    find: Callable[[], list[Path]]


def _images_under(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not skip(p))


def _package_dir(module: str, *parts: str) -> Path:
    """A folder inside an installed Python package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _tuxpaint_other() -> list[Path]:
    if not TUXPAINT_STAMPS.is_dir():
        return []
    folders = [d for d in sorted(TUXPAINT_STAMPS.iterdir()) if d.is_dir() and d.name not in EVAL_CATEGORIES]
    return [p for d in folders for p in _images_under(d)]


def _largest_variants(paths: Iterable[Path], key: Callable[[Path], str]) -> list[Path]:
    """One file per variant group (e.g. a wallpaper at several resolutions): the one with most pixels."""
    best: dict[str, tuple[int, Path]] = {}
    for path in paths:
        match = _VARIANT_SIZE.search(path.stem)
        pixels = int(match.group(1)) * int(match.group(2)) if match else 0
        group = key(path)
        if group not in best or pixels > best[group][0]:
            best[group] = (pixels, path)
    return sorted(p for _, p in best.values())


def _plasma() -> list[Path]:
    # NAME/contents/images/<W>x<H>.<ext>: one picture at several resolutions; screenshot.png is a thumbnail
    files = _images_under(Path("/usr/share/wallpapers"), skip=lambda p: p.name.startswith("screenshot"))
    return _largest_variants(files, key=lambda p: str(p.parents[2]) if p.parent.name == "images" else str(p))


def _backgrounds() -> list[Path]:
    # mate names resolution variants NAME_<W>x<H>.jpg next to NAME.jpg
    files = _images_under(Path("/usr/share/backgrounds"))
    return _largest_variants(files, key=lambda p: str(p.parent / _VARIANT_SIZE.sub("", p.stem)))


def _scratch() -> list[Path]:
    # photo backgrounds and costume drawings; the letter costumes are glyphs, not pictures
    return _images_under(Path("/usr/share/scratch/Media"), skip=lambda p: "Letters" in p.parts)


#: Known origins of installed images (licences from each package's copyright file / metadata).
ORIGINS: tuple[Origin, ...] = (
    Origin("tuxpaint-stamps", "GPL-2 (Debian tuxpaint-stamps-default)", _tuxpaint_other),
    Origin("scratch", "CC-BY-SA-3.0 (Debian scratch, Media/*)", _scratch),
    Origin("opencv-doc", "BSD-3-Clause / Apache-2.0 (Debian opencv-doc)",
           lambda: _images_under(Path("/usr/share/doc/opencv-doc/examples/data"))),
    Origin("plasma-wallpapers", "GPL-2+ (Debian plasma-workspace-wallpapers)", _plasma),
    Origin("backgrounds", "GPL-2+ / CC-BY-SA (Debian mate-backgrounds, gnome-backgrounds)", _backgrounds),
    Origin("scikit-image", "BSD-3-Clause and per-image terms (skimage/data/README.txt)",
           lambda: _images_under(_package_dir("skimage", "data"))),
    Origin("foolbox", "MIT (foolbox 3.3.4 sample images)", lambda: _images_under(_package_dir("foolbox", "data"))),
    Origin("mvtb-data", "MIT (PyPI mvtb-data)", lambda: _images_under(_package_dir("mvtbdata", "images"))),
)


def find_installed_photos(origins: Sequence[Origin] = ORIGINS) -> list[PhotoFile]:
    """Every installed image of ``origins`` (missing packages contribute nothing)."""
    return [PhotoFile(path, o.name, o.licence) for o in origins for path in o.find()]


def shrink(image: Image.Image, short_side: int) -> Image.Image:
    """``image`` scaled down so its shorter side is at most ``short_side`` (never up)."""
    scale = short_side / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _pixel_hash(image: Image.Image) -> str:
    return sha256_bytes(f"{image.size}".encode() + image.tobytes())


def build_photos(out_dir: str | Path, *, short_side: int = 512, min_side: int = 32,
                 files: Sequence[PhotoFile] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write the photo collection (shrunk copies, ``manifest.csv``, ``report.json``) to ``out_dir``.

    Args:
        out_dir: a new or existing folder (its manifest and images are replaced).
        short_side: shorter side of the stored copies (larger images are shrunk).
        min_side: images with a smaller side are dropped (icons, not photos).
        files: what to gather (default: :func:`find_installed_photos`).

    Returns:
        The report: kept images per origin and drop counts (exact duplicates, too small, unreadable).

    Raises:
        DataError: no image found at all.
    """
    out = Path(out_dir).expanduser()
    files = list(find_installed_photos() if files is None else files)
    if not files:
        raise DataError("no installed photos found (install the Debian / PyPI packages listed in docs/distill.md)")
    seen: set[str] = set()
    rows: list[dict] = []
    dropped = {"exact_duplicate": 0, "too_small": 0, "unreadable": 0}
    for item in files:
        data = item.path.read_bytes()
        try:
            image = decode_image(data, max_pixels=max_pixels)
        except ImageDecodeError:
            dropped["unreadable"] += 1
            continue
        keys = {sha256_bytes(data), _pixel_hash(image)}
        if keys & seen:
            dropped["exact_duplicate"] += 1
            continue
        seen |= keys
        if min(image.size) < min_side:
            dropped["too_small"] += 1
            continue
        rel = Path("images", item.origin, f"{len(rows):05d}.jpg")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        small = shrink(image, short_side)
        small.save(out / rel, quality=92)
        rows.append({"path": rel.as_posix(), "id": f"{item.origin}/{item.path.name}#{len(rows)}",
                     "source": item.origin, "licence": item.licence, "origin_path": str(item.path),
                     "width": image.width, "height": image.height})
    table = pd.DataFrame(rows)
    atomic_write_text(out / MANIFEST_NAME, table.to_csv(index=False))
    report = {"images": len(rows), "per_source": table["source"].value_counts().sort_index().to_dict(),
              "dropped": dropped, "short_side": short_side}
    atomic_write_json(out / "report.json", report)
    return report


def open_photos(folder: str | Path, **options: Any) -> ManifestSource:
    """The collection written by :func:`build_photos` as a (manifest) data source.

    ``options`` are :class:`ManifestSource` keyword arguments from a data spec, passed through unchecked: an
    unknown name raises ``TypeError``, which :func:`~dinoforge.core.data.spec.open_source` reports as a DataError.

    Raises:
        DataError: the folder holds no photo manifest.
    """
    manifest = Path(folder).expanduser() / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"photos:{folder}: no {MANIFEST_NAME} there; build the collection first with "
                        f"`dinoforge photos {folder}`")
    source = ManifestSource(manifest, **options)
    source.spec = f"photos:{Path(folder).expanduser().resolve()}"
    return source
