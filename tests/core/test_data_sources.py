"""Image folders, manifests and spec strings on real images (foolbox sample PNG/JPEGs, tuxpaint stamps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.data import (UNLABELLED, BadSample, ImageFolderSource, ManifestSource, Sample, open_source,
                                 parse_spec)
from dinoforge.core.errors import DataError
from tests.core.helpers import GROUPS, make_labelled_folder, write_corrupt_jpeg


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# ---------------------------------------------------------------------------------------------- folders
def test_folder_labels_order_and_decoding(sample_images_dir: Path, tmp_path: Path) -> None:
    made = make_labelled_folder(sample_images_dir, tmp_path)
    src = ImageFolderSource(tmp_path)
    assert src.classes == sorted(GROUPS)
    assert len(src) == 12
    assert src.ids == sorted(p for paths in made.values() for p in paths)
    for i, sample in enumerate(src):
        assert isinstance(sample, Sample)
        assert sample.image.mode == "RGB"
        assert src.classes[sample.label] == sample.id.split("/")[0]
        assert sample.path == str(tmp_path / sample.id)
        reference = Image.open(sample.path).convert("RGB")
        assert np.array_equal(np.asarray(sample.image), np.asarray(reference))
        assert src.labels[i] == sample.label
    assert src.spec == f"folder:{tmp_path.resolve()}"


def test_folder_unlabelled_when_images_at_root(sample_images_dir: Path, tmp_path: Path) -> None:
    for f in sorted(sample_images_dir.glob("cifar100_*"))[:3]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "sub").mkdir()
    shutil.copy(next(sample_images_dir.glob("mnist_*")), tmp_path / "sub" / "m.png")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert src.classes is None and len(src) == 4
    assert (src.labels == UNLABELLED).all()
    assert src.ids[-1] == "sub/m.png"
    with pytest.raises(DataError, match="not inside a class folder"):
        ImageFolderSource(tmp_path, labels="subfolders")


def test_folder_fixed_classes_and_unknown_class(sample_images_dir: Path, tmp_path: Path) -> None:
    make_labelled_folder(sample_images_dir, tmp_path, per_class=1)
    src = ImageFolderSource(tmp_path, classes=["mnist", "imagenet", "cifar10", "unused"])
    assert [src.classes[src[i].label] for i in range(3)] == ["cifar10", "imagenet", "mnist"]
    assert src[0].label == 2
    with pytest.raises(DataError, match="not among the given classes"):
        ImageFolderSource(tmp_path, classes=["cifar10"])


def test_folder_corrupt_jpeg_is_a_bad_sample(sample_images_dir: Path, tmp_path: Path) -> None:
    make_labelled_folder(sample_images_dir, tmp_path, per_class=2)
    write_corrupt_jpeg(tmp_path / "imagenet" / "broken.jpg", sample_images_dir)
    src = ImageFolderSource(tmp_path)
    items = list(src)
    bad = [x for x in items if isinstance(x, BadSample)]
    assert len(items) == 7 and len(bad) == 1
    assert bad[0].id == "imagenet/broken.jpg" and "decodable" in bad[0].reason


def test_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderSource(tmp_path / "empty")


def test_tuxpaint_colour_stamps(tuxpaint_dir: Path) -> None:
    src = ImageFolderSource(tuxpaint_dir / "clothes")
    assert len(src) >= 10
    sample = src[0]
    assert isinstance(sample, Sample) and sample.image.mode == "RGB"
    # Stamps are RGBA: transparent pixels become white, as decode_image composites on white.
    rgba = Image.open(sample.path).convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    assert (np.asarray(sample.image)[alpha == 0] == 255).all()


# ---------------------------------------------------------------------------------------------- manifests
def _copy_images(sample_images_dir: Path, dest: Path, n: int = 5) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for f in sorted(sample_images_dir.glob("cifar10_*"))[:n]:
        shutil.copy(f, dest / f.name)
        names.append(f.name)
    return names


def test_txt_manifest_relative_paths(sample_images_dir: Path, tmp_path: Path) -> None:
    names = _copy_images(sample_images_dir, tmp_path / "imgs")
    lines = ["# a comment", ""] + [f"imgs/{n}" for n in names]
    (tmp_path / "lists").mkdir()
    shutil.move(str(tmp_path / "imgs"), tmp_path / "lists" / "imgs")
    (tmp_path / "lists" / "all.txt").write_text("\n".join(lines) + "\n")
    src = open_source(f"manifest:{tmp_path / 'lists' / 'all.txt'}")
    assert isinstance(src, ManifestSource) and len(src) == 5 and src.classes is None
    assert src[0].path == str(tmp_path / "lists" / "imgs" / names[0])
    assert src.ids == [f"imgs/{n}" for n in names]


def test_csv_manifest_string_labels_and_extra_columns(sample_images_dir: Path, tmp_path: Path) -> None:
    names = _copy_images(sample_images_dir, tmp_path / "imgs")
    table = pd.DataFrame({"path": [f"imgs/{n}" for n in names], "label": ["dog", "cat", "dog", "", "bird"],
                          "cluster": [3, 1, 3, 2, 0], "score": [0.5, 0.25, 1.0, 0.0, 0.75]})
    table.to_csv(tmp_path / "curated.csv", index=False)
    src = ManifestSource(tmp_path / "curated.csv")
    assert src.classes == ["bird", "cat", "dog"]
    assert src.labels.tolist() == [2, 1, 2, UNLABELLED, 0]
    assert src.extra_columns == ["cluster", "score"]
    assert src[1].meta == {"cluster": 1, "score": 0.25}
    assert src[3].label is None
    assert list(src.table.columns) == ["path", "label", "cluster", "score"]
    # The test split reuses the training mapping; an unknown class name is an error.
    again = ManifestSource(tmp_path / "curated.csv", classes=["dog", "cat", "bird", "fish"])
    assert again.labels.tolist() == [0, 1, 0, UNLABELLED, 2]
    with pytest.raises(DataError, match="not among the given classes"):
        ManifestSource(tmp_path / "curated.csv", classes=["dog"])


def test_parquet_manifest_int_labels_ids_and_missing_file(sample_images_dir: Path, tmp_path: Path) -> None:
    names = _copy_images(sample_images_dir, tmp_path / "imgs", n=3)
    paths = [str(tmp_path / "imgs" / n) for n in names] + [str(tmp_path / "imgs" / "gone.png")]
    pd.DataFrame({"path": paths, "label": [0, 7, 3, 1], "id": ["a", "b", "c", "d"]}).to_parquet(tmp_path / "m.parquet")
    src = open_source(str(tmp_path / "m.parquet"))  # no scheme: inferred from the suffix
    assert src.classes is None and src.labels.tolist() == [0, 7, 3, 1] and src.ids == ["a", "b", "c", "d"]
    items = list(src)
    assert [type(x).__name__ for x in items] == ["Sample", "Sample", "Sample", "BadSample"]
    assert items[3].path == paths[3] and "cannot open" in items[3].reason


@pytest.mark.parametrize("content, match", [
    (b"\x00\x01PAR1 not really parquet", "not a readable parquet"),
])
def test_unreadable_parquet_manifest(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "bad.parquet").write_bytes(content)
    with pytest.raises(DataError, match=match):
        open_source(f"manifest:{tmp_path / 'bad.parquet'}")


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(f"manifest:{tmp_path / 'missing.csv'}")
    (tmp_path / "nopath.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match="no 'path' column"):
        ManifestSource(tmp_path / "nopath.csv")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="unknown suffix"):
        ManifestSource(tmp_path / "list.json")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(DataError, match="not a readable txt"):
        ManifestSource(tmp_path / "binary.txt")
    (tmp_path / "neg.csv").write_text("path,label\na.png,-3\n")
    with pytest.raises(DataError, match="non-negative"):
        ManifestSource(tmp_path / "neg.csv")


# ---------------------------------------------------------------------------------------------- spec strings
def test_parse_spec_forms(tmp_path: Path) -> None:
    assert str(parse_spec("fmnist:train[:5000]")) == "fmnist:train[:5000]"
    assert parse_spec("wds:/x/s-{000..009}.tar").target == "/x/s-{000..009}.tar"
    assert parse_spec("fmnist:test[~100@3]").selection == "~100@3"
    assert parse_spec(str(tmp_path)).scheme == "folder"
    assert parse_spec("/data/shards-{0..3}.tar").scheme == "wds"
    assert parse_spec("/data/list.csv").scheme == "manifest"


@pytest.mark.parametrize("spec, match", [
    ("s3:bucket/x", "unknown data source scheme 's3'"),
    ("", "empty"),
    ("fmnist:", "names no fmnist target"),
    ("/no/such/thing", "cannot tell what kind"),
    ("fmnist:validation", "unknown Fashion-MNIST split"),
    ("fmnist:test[abc]", "bad selection"),
    ("fmnist:test[~20000]", "cannot draw 20000"),
])

def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        open_source(spec)


def test_spec_selections_are_deterministic() -> None:
    head = open_source("fmnist:test[:50]")
    assert len(head) == 50 and head.ids[0] == "fmnist:test:0" and head.ids[-1] == "fmnist:test:49"
    middle = open_source("fmnist:test[100:110]")
    assert middle.ids == [f"fmnist:test:{i}" for i in range(100, 110)]
    a, b, c = (open_source(s) for s in ("fmnist:test[~200]", "fmnist:test[~200@0]", "fmnist:test[~200@1]"))
    assert a.ids == b.ids and a.ids != c.ids and len(set(a.ids)) == 200
    assert a.ids == sorted(a.ids, key=lambda s: int(s.rsplit(":", 1)[1]))  # kept in source order
    assert a.labels.tolist() == [a[i].label for i in range(len(a))]
