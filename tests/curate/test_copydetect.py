"""Copy injection and dedup scoring (the harness of the copy-detection acceptance benchmark)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.data import open_source
from dinoforge.curate.copydetect import (CopyTransforms, make_copy, make_copy_jpeg, score_dedup,
                                                  write_pool_with_copies)


def test_copies_are_transformed_jpegs(sample_images_dir: Path) -> None:
    image = Image.open(next(sample_images_dir.glob("imagenet_*"))).convert("RGB")
    t = CopyTransforms(min_side=0.8, scale=(0.5, 0.6), quality=(60, 60), flip=1.0)
    data = make_copy_jpeg(image, np.random.default_rng(0), t)
    copy = Image.open(io.BytesIO(data))
    assert copy.format == "JPEG"
    w, h = image.size
    assert 0.8 * 0.5 * w - 2 <= copy.width <= 0.6 * w + 1 and 0.8 * 0.5 * h - 2 <= copy.height <= 0.6 * h + 1
    again = make_copy(image, np.random.default_rng(0), t)
    assert np.array_equal(np.asarray(again), np.asarray(copy.convert("RGB")))  # seeded: reproducible
    # Flipped (flip=1): the copy resized back correlates better with the mirrored original than the original.
    small = np.asarray(image.resize(copy.size), dtype=np.float32).mean(axis=2)
    got = np.asarray(copy.convert("RGB"), dtype=np.float32).mean(axis=2)
    corr = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert corr(got, small[:, ::-1]) > corr(got, small)


def test_injected_pool_ground_truth(sample_images_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "some.txt").write_text("\n".join(str(p) for p in sorted(sample_images_dir.glob("*.*"))[::8]))
    sources = [open_source("fmnist:test[:40]"), open_source(f"manifest:{tmp_path / 'some.txt'}")]
    pool = write_pool_with_copies(sources, tmp_path / "pool", num_originals=10, copies_per_original=2, seed=3)
    truth = pd.read_parquet(pool.groups)
    assert pool.num_images == 53 + 20 and len(truth) == 73 and pool.num_groups == 10
    assert (truth.groupby("group").size().drop(-1) == 3).all()
    files = {p.relative_to(tmp_path / "pool").as_posix() for p in (tmp_path / "pool").rglob("*.*")}
    assert files == set(truth["id"])
    copy = truth[truth["role"] == "copy"].iloc[0]
    assert Image.open(tmp_path / "pool" / copy["id"]).format == "JPEG"


def test_score_dedup_counts(tmp_path: Path) -> None:
    truth = tmp_path / "t.parquet"
    pd.DataFrame({"id": ["a", "a1", "a2", "b", "b1", "x", "y"], "group": [0, 0, 0, 1, 1, -1, -1],
                  "role": ["original", "copy", "copy", "original", "copy", "original", "original"]}).to_parquet(truth)
    perfect = score_dedup(["a1", "a2", "b1"], truth)
    assert perfect["recall"] == 1.0 and perfect["precision"] == 1.0 and perfect["groups_kept_once"] == 1.0
    partial = score_dedup(["a1", "x"], truth)
    assert partial["recall"] == pytest.approx(1 / 3) and partial["precision"] == 0.5
    assert partial["groups_kept_once"] == 0.0
    wiped = score_dedup(["b", "b1"], truth)  # a whole group removed: one removal too many
    assert wiped["true_removals"] == 1 and wiped["false_removals"] == 1 and wiped["kept_none"] == 1
    with pytest.raises(Exception, match="not in the pool"):
        score_dedup(["zzz"], truth)
