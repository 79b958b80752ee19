"""``dinoforge extract`` on two torchrun agents ("nodes") joined by a c10d rendezvous writes the same store as one
process: the units are split by global rank, each node writes its own, rank 0 (node 0) merges the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinoforge.core.extract import FeatureStore
from tests.core.test_extract_resume import extract_args, units_done
from tests.helpers import run_cli
from tests.multinode import assert_all_ok, run_cli_nodes

DATA = "fmnist:test[:120]"
OPTIONS = ("--shard-size", "30", "--batch-size", "15", "--num-workers", "0")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_write_the_single_process_store(tiny_artifact: Path, tmp_path: Path) -> None:
    nodes = run_cli_nodes(*extract_args(tiny_artifact, DATA, tmp_path / "nodes", *OPTIONS), nnodes=2,
                          timeout=600)
    assert_all_ok(nodes)
    single = run_cli(*extract_args(tiny_artifact, DATA, tmp_path / "single", *OPTIONS), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = FeatureStore(tmp_path / "single"), FeatureStore(tmp_path / "nodes")
    assert units_done(tmp_path / "nodes") == [f"{u:05d}" for u in range(4)]
    assert b.table(["id"])["id"].to_pylist() == [f"fmnist:test:{i}" for i in range(120)]
    assert a.table().equals(b.table())
    # Batches never straddle units, so each row went through the same batch on either layout: bit-identical.
    assert np.array_equal(a.load("cls"), b.load("cls"))
    assert not list((tmp_path / "nodes").glob(".shared-check-*"))  # the shared-folder check cleaned up
