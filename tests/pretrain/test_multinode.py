"""Two torchrun agents ("nodes") joined by a c10d rendezvous train like one node with the same global batch.

Both nodes run on this machine over gloo; everything else is what a cluster does: each agent is launched with
``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`` and learns its node rank from the
rendezvous. Global ranks, not node or local ranks, decide the data slice and who writes, so 2 nodes x 1 process
must equal 1 node x 2 processes exactly, and 1 process with the whole global batch within the tolerances of
``test_distributed`` (KoLeo off and Sinkhorn-Knopp on, for the reasons given there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoforge.pretrain.monitor import read_metrics
from tests.helpers import assert_same, run_cli
from tests.multinode import assert_all_ok, run_cli_nodes
from tests.pretrain.test_distributed import COMMON, _assert_match, _losses, _params

NO_KOLEO = "model.koleo_loss_weight=0.0"


def _args(run_dir: Path, batch: int) -> list[str]:
    return ["pretrain", "--config", "tiny", f"run_dir={run_dir}", *COMMON, f"data.batch_size={batch}", NO_KOLEO]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_match_one_node_and_one_process(tmp_path: Path) -> None:
    nodes = run_cli_nodes(*_args(tmp_path / "nodes", 4), nnodes=2, nproc_per_node=1, timeout=600)
    assert_all_ok(nodes)
    one_node = run_cli(*_args(tmp_path / "node", 4), nproc=2, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-4000:]
    single = run_cli(*_args(tmp_path / "single", 8), timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]

    # Same ranks, same slices, same collectives: the node split changes nothing, bit for bit.
    assert _losses(tmp_path / "nodes") == _losses(tmp_path / "node")
    assert_same(_params(tmp_path / "nodes"), _params(tmp_path / "node"), "2 nodes vs 1 node")
    _assert_match(tmp_path / "single", tmp_path / "nodes")
    # Only global rank 0 wrote: one metrics log with one row per step, one artifact.
    assert len([r for r in read_metrics(tmp_path / "nodes") if "total_loss" in r]) == len(_losses(tmp_path / "node"))
    assert (tmp_path / "nodes" / "artifact").is_dir()
