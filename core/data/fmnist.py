"""Fashion-MNIST from its IDX files: local folders first, then the official files (checksummed) if allowed.

Search order for the four files (``.gz`` or uncompressed): the ``root`` argument, ``$DINOFORGE_FMNIST_DIR``,
the Debian ``dataset-fashion-mnist`` folder, the cache folder. Only when none has them, ``download`` is true and
``$DINOFORGE_OFFLINE`` is unset are they fetched from the official mirrors into the cache, each verified
against its official MD5 before it is renamed into place.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from dinoforge.core.data.base import IndexedSource
from dinoforge.core.data.sample import Record
from dinoforge.core.errors import DataError
from dinoforge.core.fileio import atomic_open

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
#: Official MD5 sums of the published ``.gz`` files.
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_SPLITS = {"train": ("train", 60_000), "test": ("t10k", 10_000)}
_IDX_DTYPE = {0x08: np.uint8}


def cache_dir() -> Path:
    """Download folder: ``$DINOFORGE_CACHE/fashion-mnist`` (default ``~/.cache/dinoforge/fashion-mnist``)."""
    base = os.environ.get("DINOFORGE_CACHE") or Path.home() / ".cache" / "dinoforge"
    return Path(base) / "fashion-mnist"


def search_dirs(root: str | Path | None = None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    dirs = [Path(root)] if root is not None else []
    if os.environ.get("DINOFORGE_FMNIST_DIR"):
        dirs.append(Path(os.environ["DINOFORGE_FMNIST_DIR"]))
    return [*dirs, DEBIAN_DIR, cache_dir()]


def md5_file(path: Path) -> str:
    """Hex MD5 of a file (the official Fashion-MNIST checksums are MD5)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, expected_md5: str) -> None:
    """Raise :class:`DataError` when ``path``'s MD5 is not ``expected_md5``."""
    actual = md5_file(path)
    if actual != expected_md5:
        raise DataError(f"{path}: MD5 {actual} does not match the official checksum {expected_md5}")


def download_file(url: str, dest: Path, expected_md5: str, *, timeout: float = 15.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically; the file appears only if its MD5 matches.

    Raises:
        DataError: network unreachable, HTTP error, or checksum mismatch (nothing is left at ``dest``).
    """
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_open(dest, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != expected_md5:
                raise DataError(f"download of {url}: MD5 {digest.hexdigest()} does not match the official "
                                f"checksum {expected_md5}; the file was discarded")
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataError(f"cannot download {url}: {getattr(err, 'reason', err)}") from err
    return dest


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / f"{name}.gz", d / name):
            if candidate.is_file():
                return candidate
    return None


def _fetch(name: str, tried: list[Path]) -> Path:
    gz = f"{name}.gz"
    errors = []
    for mirror in MIRRORS:
        try:
            return download_file(mirror + gz, cache_dir() / gz, OFFICIAL_MD5[gz])
        except DataError as err:
            errors.append(str(err))
    raise DataError(f"Fashion-MNIST file {gz} not found in {', '.join(map(str, tried))} and the download "
                    f"failed ({'; '.join(errors)}). Install the Debian package dataset-fashion-mnist or put the "
                    f"files in a folder given by DINOFORGE_FMNIST_DIR")


def locate(name: str, root: str | Path | None = None, *, download: bool = True) -> Path:
    """Path of IDX file ``name`` (e.g. ``train-images-idx3-ubyte``), downloading it if allowed."""
    dirs = search_dirs(root)
    found = _find(name, dirs)
    if found is not None:
        return found
    if not download or os.environ.get("DINOFORGE_OFFLINE"):
        raise DataError(f"Fashion-MNIST file {name}(.gz) not found in {', '.join(map(str, dirs))} and "
                        "downloading is disabled (download=False or DINOFORGE_OFFLINE set)")
    return _fetch(name, dirs)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes into an array of the header's shape.

    Raises:
        DataError: bad magic number, unsupported type, or a size that disagrees with the header.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable IDX file: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPE:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(data) - header} values")
    return np.frombuffer(data, dtype=_IDX_DTYPE[data[2]], offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_split_cached(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_path} / {labels_path}: expected [N, H, W] images and [N] labels, got "
                        f"{list(images.shape)} and {list(labels.shape)}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str, root: str | Path | None = None, *,
                       download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` (``train`` or ``test``)."""
    if split not in _SPLITS:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    prefix, expected = _SPLITS[split]
    images, labels = _load_split_cached(locate(f"{prefix}-images-idx3-ubyte", root, download=download),
                                        locate(f"{prefix}-labels-idx1-ubyte", root, download=download))
    if len(images) != expected or images.shape[1:] != (28, 28) or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST {split}: expected {expected} images of 28x28 with labels 0-9, got "
                        f"{list(images.shape)}")
    return images, labels


class FashionMNISTSource(IndexedSource):
    """Fashion-MNIST as an indexed source; ids ``fmnist:<split>:<index>``, RGB 28x28 images.

    Args:
        split: ``train`` (60 000) or ``test`` (10 000).
        root: folder searched first for the IDX files.
        download: allow fetching the official files when no folder has them.
    """

    def __init__(self, split: str = "train", *, root: str | Path | None = None, download: bool = True) -> None:
        self.split = split
        self.images, self.targets = load_fashion_mnist(split, root, download=download)
        self.classes = list(FASHION_MNIST_CLASSES)
        self.spec = f"fmnist:{split}"

    def __len__(self) -> int:
        return len(self.targets)

    def record(self, index: int) -> Record:
        return Record(id=f"fmnist:{self.split}:{index}", path=None, label=int(self.targets[index]))

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    @property
    def ids(self) -> list[str]:
        return [f"fmnist:{self.split}:{i}" for i in range(len(self))]

    @property
    def labels(self) -> np.ndarray:
        return self.targets.copy()
