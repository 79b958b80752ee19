"""WebDataset shards written with ``tarfile`` from real images: grouping, labels, sharding, shuffling, bad shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoforge.core.data import (BadSample, Sample, WebDatasetSource, expand_braces, image_batches, iter_good,
                                 open_source)
from dinoforge.core.data.loader import SkipStats
from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import PreprocessConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(sample_images_dir: Path, out: Path, n_shards: int = 3, per_shard: int = 4) -> list[tuple[str, int]]:
    """Shards ``shard-00{0..n}.tar`` of real PNGs with ``cls`` labels and a ``json`` member; returns (id, label)."""
    images = sorted(sample_images_dir.glob("cifar10_*.png"))
    expected = []
    for s in range(n_shards):
        with tarfile.open(out / f"shard-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                path = images[(s * per_shard + j) % len(images)]
                key = f"sample{s}_{j}"
                label = int(path.stem.rsplit("_", 1)[1])
                _add(tar, f"{key}.png", path.read_bytes())
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps({"src": path.name}).encode())
                expected.append((f"shard-{s:03d}.tar/{key}", label))
    return expected


def test_expand_braces() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="backwards"):
        expand_braces("s-{5..1}.tar")


def test_samples_grouped_by_key(sample_images_dir: Path, tmp_path: Path) -> None:
    expected = write_shards(sample_images_dir, tmp_path)
    src = open_source(f"wds:{tmp_path}/shard-{{000..002}}.tar")
    assert isinstance(src, WebDatasetSource)
    samples = list(src)
    assert [(s.id, s.label) for s in samples] == expected
    first = samples[0]
    assert isinstance(first, Sample) and first.image.mode == "RGB" and first.path is None
    assert first.meta["json"]["src"].startswith("cifar10_") and first.meta["shard"] == "shard-000.tar"
    original = Image.open(sample_images_dir / first.meta["json"]["src"]).convert("RGB")
    assert np.array_equal(np.asarray(first.image), np.asarray(original))


def test_txt_labels_with_classes_file_and_nested_keys(sample_images_dir: Path, tmp_path: Path) -> None:
    png = next(sample_images_dir.glob("mnist_*.png")).read_bytes()
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, text in [("a", "cat"), ("b", "dog"), ("c", "7"), ("d", "zebra")]:
            _add(tar, f"./dir/{name}.png", png)  # key "dir/a"
            _add(tar, f"./dir/{name}.seg.png", png)  # extension "seg.png": not the image, kept in meta
            _add(tar, f"./dir/{name}.txt", text.encode())
        _add(tar, "dir/e.txt", b"cat")  # a sample without an image
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    items = list(WebDatasetSource(str(tmp_path / "s.tar")))
    assert [(x.id, getattr(x, "label", None)) for x in items[:3]] == [("s.tar/dir/a", 0), ("s.tar/dir/b", 1),
                                                                      ("s.tar/dir/c", 7)]

    assert items[0].meta["seg.png"] == png
    assert isinstance(items[3], BadSample) and "unknown" in items[3].reason
    assert isinstance(items[4], BadSample) and "no image member" in items[4].reason
    # Without class names, a non-integer txt stays as text and the sample is unlabelled.
    (tmp_path / "classes.txt").unlink()
    last = list(WebDatasetSource(str(tmp_path / "s.tar")))[3]
    assert last.label is None and last.meta["txt"] == "zebra"


def test_corrupt_and_truncated_shards_are_skipped(sample_images_dir: Path, tmp_path: Path) -> None:
    expected = write_shards(sample_images_dir, tmp_path, n_shards=3)
    (tmp_path / "shard-001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    data = (tmp_path / "shard-002.tar").read_bytes()
    (tmp_path / "shard-002.tar").write_bytes(data[: len(data) // 2 + 100])
    stats = SkipStats()
    good = list(iter_good(WebDatasetSource(f"{tmp_path}/shard-{{000..002}}.tar"), stats))
    ids = [s.id for s in good]
    assert ids[:4] == [e[0] for e in expected[:4]]  # shard 0 intact
    assert all(i.startswith("shard-002.tar/") for i in ids[4:]) and 0 < len(ids[4:]) < 4  # shard 2 partly
    bad_ids = {b.id for b in stats.bad_samples}
    assert bad_ids == {"shard-001.tar", "shard-002.tar"} and stats.bad == 2
    assert all("corrupt or truncated" in b.reason for b in stats.bad_samples)


def test_missing_shard_is_an_error(sample_images_dir: Path, tmp_path: Path) -> None:
    write_shards(sample_images_dir, tmp_path, n_shards=2)
    with pytest.raises(DataError, match="1 of 3 WebDataset shards do not exist"):
        open_source(f"wds:{tmp_path}/shard-{{000..002}}.tar")


def test_workers_and_ranks_split_the_shards(sample_images_dir: Path, tmp_path: Path) -> None:
    expected = write_shards(sample_images_dir, tmp_path, n_shards=4, per_shard=3)
    pattern = f"{tmp_path}/shard-{{000..003}}.tar"
    cfg = PreprocessConfig(mode="resize", size=16, patch_size=4)
    loader = image_batches(WebDatasetSource(pattern), cfg, batch_size=2, num_workers=2)
    seen = [i for batch in loader for i in batch.ids]
    assert sorted(seen) == sorted(e[0] for e in expected) and loader.stats.good == 12
    per_rank = [[s.id for s in WebDatasetSource(pattern, rank=r, world_size=2)] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(e[0] for e in expected)
    assert not set(per_rank[0]) & set(per_rank[1])


def test_shuffling_is_seeded_per_epoch(sample_images_dir: Path, tmp_path: Path) -> None:
    write_shards(sample_images_dir, tmp_path, n_shards=4, per_shard=3)
    pattern = f"{tmp_path}/shard-{{000..003}}.tar"

    def order(seed: int, epoch: int) -> list[str]:
        src = WebDatasetSource(pattern, shuffle=True, seed=seed, buffer_size=5)
        src.set_epoch(epoch)
        return [s.id for s in src]

    plain = [s.id for s in WebDatasetSource(pattern)]
    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == sorted(plain) and order(0, 0) != plain
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)


def test_stream_slice_needs_single_worker(sample_images_dir: Path, tmp_path: Path) -> None:
    write_shards(sample_images_dir, tmp_path, n_shards=2)
    src = open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar[2:5]")
    assert [s.id for s in src] == ["shard-000.tar/sample0_2", "shard-000.tar/sample0_3", "shard-001.tar/sample1_0"]
    cfg = PreprocessConfig(mode="resize", size=16, patch_size=4)
    with pytest.raises(DataError, match="num_workers=0 or 1"):
        list(image_batches(src, cfg, batch_size=2, num_workers=2))
    with pytest.raises(DataError, match="indexed source"):
        open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar[~3]")
