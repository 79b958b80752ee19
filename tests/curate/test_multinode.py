"""Curation on two torchrun agents ("nodes") joined by a c10d rendezvous equals one process.

The distributed steps of curation: embedding (extraction units split over global ranks) and every index search
(self-dedup k-NN, relative dedup, sample retrieval: query chunks split over global ranks, rank 0 builds the
index and merges). Union-find, k-means, balancing and the manifest run on rank 0. This test runs the searches
on precomputed ``features:`` stores; the embedding step is the extraction engine, tested on two nodes in
``tests/core/test_extract_multinode.py``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from dinoforge.curate.pipeline import run_curation
from tests.curate.test_pipeline_embeddings import planted, recipe, stores
from tests.multinode import assert_all_ok, run_cli_nodes


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_give_the_single_process_result(tmp_path: Path) -> None:
    specs = stores(tmp_path, planted(3))
    single = recipe(tmp_path / "single", specs, "ivf_flat")
    run_curation(single)
    cfg = single.model_dump(mode="json")
    cfg["output"] = str(tmp_path / "nodes")
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(cfg))
    assert_all_ok(run_cli_nodes("curate", "--config", str(tmp_path / "nodes.yaml"), nnodes=2, timeout=600))

    assert len(list((tmp_path / "nodes" / "dedup" / "edges").glob("chunk-*.npz"))) == 7  # both nodes searched
    for name in ("dedup/removed.parquet", "relative/removed.parquet", "retrieval/sample.parquet",
                 "retrieval/cluster.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "single" / "run" / name),
                                      pd.read_parquet(tmp_path / "nodes" / name))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "single" / "run" / "manifest.csv"),
                                  pd.read_csv(tmp_path / "nodes" / "manifest.csv"))
