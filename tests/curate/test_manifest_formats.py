"""The curated manifest in its three formats: CSV, parquet and the memory-mapped Arrow file pretraining reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoforge.core.data.arrow_manifest import ArrowManifestSource
from dinoforge.core.data.manifest import ManifestSource
from dinoforge.curate.manifest import MANIFEST_COLUMNS, write_manifest


def _manifest(folder: Path, labels: list[int | None]) -> pd.DataFrame:
    from PIL import Image

    paths = []
    for i in range(len(labels)):
        path = folder / f"img{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    frame = pd.DataFrame({"path": paths, "label": pd.array(labels, dtype="Int64"),
                          "id": [f"img{i}.png" for i in range(len(labels))], "pool_row": np.arange(len(labels)),
                          "seed_set": ["cifar", "", "cifar", ""][: len(labels)],
                          "step": ["sample", "balance", "cluster", "balance"][: len(labels)],
                          "seed_id": ["s0", "", "", ""][: len(labels)],
                          "similarity": np.array([0.9, np.nan, 0.5, np.nan][: len(labels)], np.float32),
                          "balance_cluster": np.array([0, 1, 1, -1][: len(labels)])})
    return frame[MANIFEST_COLUMNS]


@pytest.mark.parametrize("labels", [[3, 1, 0, 2], [None, None, None, None]])
def test_the_arrow_manifest_reads_as_the_csv_one(tmp_path: Path, labels: list[int | None]) -> None:
    frame = _manifest(tmp_path, labels)
    write_manifest(frame, str(tmp_path / "manifest.csv"), "csv")
    write_manifest(frame, str(tmp_path / "manifest.arrow"), "arrow")
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.arrow", "manifest.csv"]  # no staging
    csv, arrow = ManifestSource(tmp_path / "manifest.csv"), ArrowManifestSource(tmp_path / "manifest.arrow")
    assert len(arrow) == len(csv) == 4
    for i in range(4):
        a, c = arrow.record(i), csv.record(i)
        assert (a.id, a.label, Path(a.path)) == (c.id, c.label, Path(c.path))
        assert np.array_equal(np.asarray(arrow[i].image), np.asarray(csv[i].image))
    assert {"seed_set", "step", "similarity"} <= set(arrow.extra_columns)
