"""Extraction jobs as real processes: SIGKILL mid-run then resume, and two torchrun ranks on gloo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinoforge.core.artifact import load_artifact
from dinoforge.core.data import open_source
from dinoforge.core.extract import FeatureStore
from dinoforge.core.preprocess import preprocess_image
from tests.helpers import cli_command, kill_when, process_env, run_cli

def extract_args(artifact: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(artifact), "--input", data, "--output", str(out), "--no-progress", *extra]


def check_against_forward(store: FeatureStore, artifact: Path, data: str, rows: list[int]) -> None:
    """Stored CLS features of the given rows equal a direct forward pass of those inputs (float16 storage)."""
    art = load_artifact(artifact)
    src = open_source(data)
    table = store.table(["id", "source_index"]).to_pandas()
    feats = store.load("cls")
    with torch.inference_mode():
        for row in rows:
            index = int(table["source_index"][row])
            sample = src[index]
            assert sample.id == table["id"][row]
            ref = art.backbone.forward_dino(preprocess_image(sample.image, art.card.preprocessing)[None])
            np.testing.assert_allclose(feats[row].astype(np.float32), ref["x_norm_clstoken"][0].numpy(),
                                       atol=1e-2, rtol=1e-2)


def units_done(out: Path) -> list[str]:
    shards = out / "shards"
    return sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) if shards.is_dir() else []


@pytest.mark.slow
def test_sigkill_then_resume_gives_every_input_exactly_once(tiny_artifact: Path, tmp_path: Path) -> None:
    n, data, out = 1500, "fmnist:test[:1500]", tmp_path / "out"
    args = extract_args(tiny_artifact, data, out, "--shard-size", "150", "--batch-size", "15", "--num-workers", "1")
    kill_when(cli_command(*args), lambda: len(units_done(out)) >= 2, env=process_env())
    before = units_done(out)
    assert 2 <= len(before) < 10 and not (out / "index.parquet").exists()
    stamps = {u: (out / "shards" / u / "unit.json").stat().st_mtime_ns for u in before}

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    store = FeatureStore(out)
    ids = store.table(["id"])["id"].to_pylist()
    assert ids == [f"fmnist:test:{i}" for i in range(n)]  # no lost and no duplicated row, in order
    assert store.num_rows == n and sum(a.shape[0] for a in store.part_arrays("cls")) == n
    assert {u: (out / "shards" / u / "unit.json").stat().st_mtime_ns for u in before} == stamps  # kept, not redone
    assert not list((out / "shards").glob(".*.tmp"))  # the killed run's staging folder was cleaned up
    check_against_forward(store, tiny_artifact, data, [0, 149, 150, 1234, 1499])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_ranks_split_the_units(tiny_artifact: Path, tmp_path: Path) -> None:
    data, out = "fmnist:test[:200]", tmp_path / "out"
    done = run_cli(*extract_args(tiny_artifact, data, out, "--shard-size", "30", "--batch-size", "16",
                                 "--num-workers", "0"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    store = FeatureStore(out)
    assert store.table(["id"])["id"].to_pylist() == [f"fmnist:test:{i}" for i in range(200)]
    # Each rank wrote the units u with u % 2 == rank; both sets are there and the merge is complete.
    assert units_done(out) == [f"{u:05d}" for u in range(7)]
    check_against_forward(store, tiny_artifact, data, [0, 31, 95, 199])
