"""Memory-mapped Arrow manifests and the block-wise epoch order: same samples as the pandas reader, bounded memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from dinoforge.core.data import (ArrowManifestSource, EpochOrder, ManifestSource, RankSampler, convert_manifest,
                                 open_source)
from dinoforge.core.data.arrow_manifest import main as convert_main
from dinoforge.core.data.sample import UNLABELLED
from dinoforge.core.errors import DataError

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_manifest_rss.py"


def _copy_images(src: Path, dst: Path, n: int = 5) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in sorted(src.glob("cifar10_*.png"))[:n]]
    for name in names:
        shutil.copy(src / name, dst / name)
    return names


@pytest.mark.parametrize("form", ["csv", "parquet", "txt"])
def test_converted_manifest_reads_like_the_original(sample_images_dir: Path, tmp_path: Path, form: str) -> None:
    names = _copy_images(sample_images_dir, tmp_path / "imgs")
    paths = [f"imgs/{n}" for n in names] + ["imgs/gone.png"]
    table = pd.DataFrame({"path": paths, "label": ["dog", "cat", "dog", "", "bird", "cat"],
                          "cluster": [3, 1, 3, 2, 0, 1]})
    if form == "csv":
        table.to_csv(tmp_path / "m.csv", index=False)
    elif form == "parquet":
        table.assign(label=table["label"].replace("", None)).to_parquet(tmp_path / "m.parquet")
    else:
        (tmp_path / "m.txt").write_text("# list\n" + "\n".join(paths) + "\n")
    original = ManifestSource(tmp_path / f"m.{form}")
    assert convert_manifest(tmp_path / f"m.{form}", tmp_path / "m.arrow", batch_rows=4) == 6
    mapped = open_source(f"manifest:{tmp_path / 'm.arrow'}")
    assert isinstance(mapped, ArrowManifestSource) and len(mapped) == 6
    assert mapped.classes == original.classes and mapped.extra_columns == original.extra_columns
    assert mapped.labels.tolist() == original.labels.tolist() and list(mapped.ids) == original.ids
    for i in range(6):
        assert mapped.record(i) == original.record(i)
    items, expected = list(mapped), list(original)
    assert [type(x).__name__ for x in items] == [type(x).__name__ for x in expected] == ["Sample"] * 5 + ["BadSample"]
    assert np.array_equal(np.asarray(items[0].image), np.asarray(expected[0].image))


def test_integer_labels_ids_root_and_fixed_classes(tmp_path: Path) -> None:
    table = pa.table({"path": ["a.png", "/abs/b.png", "c.png"], "label": pa.array([4, None, 0], pa.int64()),
                      "id": ["x", "y", "z"]})
    with pa.ipc.new_file(str(tmp_path / "m.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # two record batches: records cross a chunk boundary
    src = ArrowManifestSource(tmp_path / "m.arrow", root=tmp_path / "images")
    assert src.classes is None and src.labels.tolist() == [4, UNLABELLED, 0]
    assert [src.record(i).path for i in range(3)] == [str(tmp_path / "images" / "a.png"), "/abs/b.png",
                                                      str(tmp_path / "images" / "c.png")]
    assert src.ids[-1] == "z" and src.ids[0:2] == ["x", "y"] and src.record(-1).id == "z"
    with pytest.raises(IndexError):
        src.record(3)
    strings = pa.table({"path": ["a.png", "b.png"], "label": ["cat", "dog"]})
    feather.write_feather(strings, tmp_path / "s.feather", compression="uncompressed")
    assert ArrowManifestSource(tmp_path / "s.feather", classes=["dog", "cat"]).labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="not among the given classes"):
        ArrowManifestSource(tmp_path / "s.feather", classes=["dog"])


def test_bad_arrow_manifests_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(f"manifest:{tmp_path / 'none.arrow'}")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 10)
    with pytest.raises(DataError, match="not a readable Arrow IPC file"):
        open_source(f"manifest:{tmp_path / 'junk.arrow'}")
    feather.write_feather(pa.table({"file": ["a.png"]}), tmp_path / "nopath.arrow", compression="uncompressed")
    with pytest.raises(DataError, match="no 'path' column"):
        open_source(str(tmp_path / "nopath.arrow"))
    feather.write_feather(pa.table({"path": ["a.png"], "label": [-2]}), tmp_path / "neg.arrow",
                          compression="uncompressed")
    with pytest.raises(DataError, match="non-negative"):
        open_source(str(tmp_path / "neg.arrow"))
    big = pa.table({"path": [f"images/{i:09d}.jpg" for i in range(800_000)]})
    feather.write_feather(big, tmp_path / "lz4.arrow", compression="lz4")
    with pytest.raises(DataError, match="compressed"):
        open_source(str(tmp_path / "lz4.arrow"))
    assert convert_main([str(tmp_path / "none.csv"), str(tmp_path / "out.arrow")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("path\na.png\n")
    assert convert_main([str(tmp_path / "m.csv"), str(tmp_path / "out.parquet")]) == 2
    assert convert_main([str(tmp_path / "m.csv"), str(tmp_path / "out.arrow")]) == 0
    assert len(open_source(str(tmp_path / "out.arrow"))) == 1


def test_epoch_order_blocks_are_a_permutation_per_epoch() -> None:
    order = EpochOrder(1000, seed=5, block_size=64)  # 16 blocks, the last one short
    first, second = order.indices(0, 1000), order.indices(1000, 1000)
    assert sorted(first) == sorted(second) == list(range(1000)) and not np.array_equal(first, second)
    assert np.array_equal(EpochOrder(1000, seed=5, block_size=64).indices_at(np.array([1999, 3, 1500])),
                          [second[999], first[3], second[500]])  # any positions, any order, a fresh instance
    assert np.array_equal(order.indices(990, 20), np.concatenate([first[990:], second[:10]]))
    assert not np.array_equal(EpochOrder(1000, seed=6, block_size=64).indices(0, 1000), first)
    # One block: the plain seeded permutation of every row (the order small datasets always had).
    assert np.array_equal(EpochOrder(10, seed=3, key=[3]).indices(0, 10),
                          np.random.default_rng([3, 3, 0]).permutation(10))
    assert EpochOrder(7, seed=0, shuffle=False).indices(5, 4).tolist() == [5, 6, 0, 1]


@pytest.mark.parametrize("position", [0, 37, 500])
def test_resume_at_a_global_position_with_another_world_size(position: int) -> None:
    """2 ranks up to global position P, then 3 ranks from P: every row of the epoch exactly once."""
    order = EpochOrder(1001, seed=1, block_size=100)
    before = [i for r in range(2) for i in list(RankSampler(order, epoch=2, rank=r, world_size=2, chunk=64))
              [: (position - r + 1) // 2]]  # rank r has taken the positions p < P with p % 2 == r
    after = [list(RankSampler(order, epoch=2, rank=r, world_size=3, start=position, chunk=64)) for r in range(3)]
    assert [len(a) for a in after] == [len(RankSampler(order, epoch=2, rank=r, world_size=3, start=position))
                                       for r in range(3)]
    rows = before + [i for a in after for i in a]
    assert sorted(rows) == list(range(1001))
    assert sorted(before) == sorted(order.indices(2 * 1001, position).tolist())


def test_memory_does_not_grow_with_the_manifest(tmp_path: Path) -> None:
    """Anonymous memory of a reader process is flat in the row count (the bench, at two small sizes)."""
    done = subprocess.run([sys.executable, str(BENCH), "--rows", "100000", "500000", "--take", "1000", "--block-size", "16384",
                           "--dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    small, large = json.loads(done.stdout.strip().splitlines()[-1])
    rows_added = large["rows"] - small["rows"]

    def per_row(key: str) -> float:
        return (large[key] - small[key]) * 2**20 / rows_added

    # pandas needs ~280 bytes a row in every rank; the mapped reader adds next to no private memory, and the
    # manifest pages it maps stay a fraction of the file (~37 bytes a row here): it is never read whole.
    assert per_row("anon_mb") < 4.0, (small, large)
    assert per_row("peak_rss_mb") < 0.5 * per_row("file_size_mb"), (small, large)
