"""Fashion-MNIST IDX reading (against torchvision's independent reader and foolbox's PNG copies) and the
checksum/download logic, exercised on local files only (``file://`` URLs; the network is never used)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoforge.core.data import FASHION_MNIST_CLASSES, FashionMNISTSource, Sample, read_idx
from dinoforge.core.data import fmnist
from dinoforge.core.errors import DataError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def _reference_idx(path: Path) -> np.ndarray:
    """A second, independent IDX parser (struct header, explicit dimension count)."""
    data = gzip.decompress(path.read_bytes())
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype_code == 0x08
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.array(bytearray(data[4 + 4 * ndim:]), dtype=np.uint8).reshape(shape)


def test_test_split_matches_reference_parser(fmnist_dir: Path, tmp_path: Path) -> None:
    src = FashionMNISTSource("test")
    images = _reference_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and np.array_equal(src.images, images)
    assert np.array_equal(src.targets, _reference_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz"))
    # Uncompressed files (a configured folder may hold them) give the same arrays.
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((fmnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(raw), images)


def test_sizes_balance_and_foolbox_copies(sample_images_dir: Path) -> None:
    train, test = FashionMNISTSource("train"), FashionMNISTSource("test")
    assert len(train) == 60_000 and len(test) == 10_000 and train.classes == FASHION_MNIST_CLASSES
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    # The foolbox wheel ships the first 20 test images as fashionMNIST_<index>_<label>.png.
    for png in sorted(sample_images_dir.glob("fashionMNIST_*.png")):
        index, label = (int(v) for v in png.stem.split("_")[1:])
        sample = test[index]
        assert isinstance(sample, Sample) and sample.label == label and sample.id == f"fmnist:test:{index}"
        assert np.array_equal(np.asarray(sample.image)[..., 0], np.asarray(Image.open(png)))
        assert sample.image.mode == "RGB"


def test_configured_root_comes_first(fmnist_dir: Path, tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        data = gzip.decompress((fmnist_dir / f"{name}.gz").read_bytes())
        (tmp_path / name).write_bytes(data)
    assert fmnist.locate("t10k-images-idx3-ubyte", tmp_path) == tmp_path / "t10k-images-idx3-ubyte"
    assert fmnist.locate("t10k-images-idx3-ubyte") == fmnist_dir / "t10k-images-idx3-ubyte.gz"


def test_corrupt_idx_files(tmp_path: Path) -> None:
    (tmp_path / "bad-magic").write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad-magic")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(DataError, match="header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "x.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable IDX"):
        read_idx(tmp_path / "x.gz")


def test_checksum_verification(fmnist_dir: Path) -> None:
    path = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    right = hashlib.md5(path.read_bytes()).hexdigest()
    fmnist.verify_checksum(path, right)
    with pytest.raises(DataError, match="does not match the official checksum"):
        fmnist.verify_checksum(path, "0" * 32)


def test_download_file_checks_md5_and_is_atomic(fmnist_dir: Path, tmp_path: Path) -> None:
    src = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    right = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="does not match the official checksum"):
        fmnist.download_file(src.as_uri(), dest, "f" * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())  # no partial or temporary file left
    fmnist.download_file(src.as_uri(), dest, right)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(DataError, match="cannot download"):
        fmnist.download_file((tmp_path / "missing.gz").as_uri(), tmp_path / "o.gz", right)
    with pytest.raises(DataError, match="cannot download"):
        fmnist.download_file("http://127.0.0.1:9/train-images-idx3-ubyte.gz", tmp_path / "o.gz", right, timeout=2)


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Debian folder, an empty cache: the lookup must fall through to the download step."""
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("DINOFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DINOFORGE_FMNIST_DIR", raising=False)
    monkeypatch.delenv("DINOFORGE_OFFLINE", raising=False)
    fmnist._load_split_cached.cache_clear()
    return tmp_path / "cache" / "fashion-mnist"


def test_download_fallback_from_a_local_mirror(fmnist_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:

    cache = _isolate(monkeypatch, tmp_path)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    sums = {}
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fmnist_dir / name, mirror / name)
        sums[name] = hashlib.md5((mirror / name).read_bytes()).hexdigest()
    # Debian recompresses the .gz files, so the official MD5s are swapped for these copies' own sums.
    monkeypatch.setattr(fmnist, "OFFICIAL_MD5", {**fmnist.OFFICIAL_MD5, **sums})
    monkeypatch.setattr(fmnist, "MIRRORS", ("http://127.0.0.1:9/", mirror.as_uri() + "/"))
    src = FashionMNISTSource("test")
    assert len(src) == 10_000 and (cache / "t10k-images-idx3-ubyte.gz").is_file()
    fmnist._load_split_cached.cache_clear()


def test_closed_network_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setattr(fmnist, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(DataError, match="download failed.*dataset-fashion-mnist"):
        FashionMNISTSource("test")
    with pytest.raises(DataError, match="downloading is disabled"):
        FashionMNISTSource("test", download=False)
    monkeypatch.setenv("DINOFORGE_OFFLINE", "1")
    with pytest.raises(DataError, match="downloading is disabled"):
        FashionMNISTSource("test")
    fmnist._load_split_cached.cache_clear()
