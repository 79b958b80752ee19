"""Node awareness of ``core.runtime``: global / local / node ranks from torchrun's environment, per-node GPU
choice, and the shared-folder check every multi-node job runs on its output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.runtime import Runtime, init_runtime, read_topology, require_shared_dir, resolve_device

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No torchrun variables unless the test sets them."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _set(env: pytest.MonkeyPatch, **values: int) -> None:
    for name, value in values.items():
        env.setenv(name, str(value))


def test_a_plain_process_is_rank_0_of_one_node(env: pytest.MonkeyPatch) -> None:
    rt = init_runtime("cpu")
    assert (rt.rank, rt.world_size, rt.local_rank, rt.local_world_size, rt.node_rank, rt.num_nodes) == (0, 1, 0, 1, 0, 1)
    assert rt.is_main and rt.is_local_main and not rt.distributed


def test_second_node_ranks_are_read_from_torchrun(env: pytest.MonkeyPatch) -> None:
    # Rank 3 of 2 nodes x 2 processes: node 1, local rank 1. It writes nothing (global rank decides) and is
    # not its node's first process either.
    _set(env, RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, GROUP_RANK=1, GROUP_WORLD_SIZE=2)
    topo = read_topology()
    assert topo == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2, "node_rank": 1,
                    "num_nodes": 2}
    rt = Runtime(device=torch.device("cpu"), **topo)
    assert not rt.is_main and not rt.is_local_main and rt.distributed
    assert rt.describe() == "rank 3 of 4 (node 1 of 2, local rank 1 of 2)"
    _set(env, RANK=2, LOCAL_RANK=0)
    assert Runtime(device=torch.device("cpu"), **read_topology()).is_local_main


def test_without_node_variables_the_job_is_one_node(env: pytest.MonkeyPatch) -> None:
    _set(env, RANK=1, WORLD_SIZE=2, LOCAL_RANK=1)  # a launcher that sets only the classic three
    topo = read_topology()
    assert (topo["local_world_size"], topo["node_rank"], topo["num_nodes"]) == (2, 0, 1)


@pytest.mark.parametrize(("values", "message"), [
    ({"RANK": 4, "WORLD_SIZE": 4}, "RANK 4 is outside WORLD_SIZE 4"),
    ({"RANK": 1, "WORLD_SIZE": 4, "LOCAL_RANK": 2, "LOCAL_WORLD_SIZE": 2}, "LOCAL_RANK 2 / LOCAL_WORLD_SIZE 2"),
    ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 4}, "do not fit WORLD_SIZE 2"),
    ({"RANK": 1, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 2, "GROUP_RANK": 2, "GROUP_WORLD_SIZE": 2},
     "GROUP_RANK 2 is outside GROUP_WORLD_SIZE 2"),
])
def test_inconsistent_rank_variables_are_config_errors(env: pytest.MonkeyPatch, values: dict[str, int],
                                                      message: str) -> None:
    _set(env, **values)
    with pytest.raises(ConfigError, match=message):
        init_runtime("cpu")


def test_env_variable_that_is_not_a_number(env: pytest.MonkeyPatch) -> None:
    env.setenv("GROUP_RANK", "node-a")
    with pytest.raises(ConfigError, match="GROUP_RANK='node-a' is not an integer"):
        read_topology()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda", local_rank=1)
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_local_rank_picks_this_nodes_gpu_and_a_missing_one_is_named() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("cuda", local_rank=count - 1) == torch.device("cuda", count - 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=f"this node has {count} GPU"):
        resolve_device("cuda", local_rank=count)


# ------------------------------------------------------------------------------ shared folder, 2 gloo ranks
def _shared_dir_worker(rank: int, init_file: str, folders: list[str], out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=2, node_rank=rank, num_nodes=2)
    try:
        require_shared_dir(rt, Path(folders[rank]), "run_dir", wait_s=1.0)
        outcome = "ok"
    except DataError as err:
        outcome = str(err)
    finally:
        dist.destroy_process_group()
    Path(f"{out_file}.{rank}").write_text(outcome)


def _check_on_two_nodes(tmp_path: Path, folders: list[Path]) -> list[str]:
    # fork: the children reuse the imported modules (spawn would re-import torch, ~10 s on 2 busy cores).
    mp.start_processes(_shared_dir_worker, args=(str(tmp_path / "init"), [str(f) for f in folders],
                                                 str(tmp_path / "out")), nprocs=2, join=True, start_method="fork")
    return [(tmp_path / f"out.{rank}").read_text() for rank in range(2)]


def test_a_shared_folder_passes_and_leaves_no_marker(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _check_on_two_nodes(tmp_path, [run, run]) == ["ok", "ok"]
    assert run.is_dir() and list(run.iterdir()) == []


def test_a_node_local_folder_fails_on_every_rank(tmp_path: Path) -> None:
    # Node 1 sees another disk at the same path: simulated by giving rank 1 another folder.
    outcomes = _check_on_two_nodes(tmp_path, [tmp_path / "node0" / "run", tmp_path / "node1" / "run"])
    for outcome in outcomes:
        assert "is not shared between the nodes: ranks [1] cannot see" in outcome


def test_a_folder_rank_0_cannot_create_fails_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    outcomes = _check_on_two_nodes(tmp_path, [tmp_path / "file" / "run"] * 2)
    for outcome in outcomes:
        assert "cannot be written by rank 0" in outcome
