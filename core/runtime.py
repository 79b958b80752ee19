"""The process runtime of every multi-process job: device choice, process group (torchrun), barriers, seeding.

Pretraining, distillation, extraction and curation run the same on one CPU process, one GPU,
``torchrun --nproc-per-node=N`` on one machine, or torchrun agents on several nodes joined by a c10d rendezvous
(gloo on CPU, NCCL on GPUs). Nothing assumes one node: the *global* rank decides who writes (rank 0), the
*local* rank picks the GPU on its node, and a folder that every rank must see is checked to be shared
(:func:`require_shared_dir`). A device is a choice, never an assumption: ``auto`` takes this rank's GPU when
CUDA is there, anything else is checked.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinoforge.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Attributes:
        device: this rank's device (a GPU is chosen by ``local_rank``: GPUs are numbered per node).
        rank / world_size: the global rank among all processes of all nodes (torchrun's ``RANK`` /
            ``WORLD_SIZE``; ``0 / 1`` for a plain process).
        local_rank / local_world_size: the rank among this node's processes (``LOCAL_RANK`` /
            ``LOCAL_WORLD_SIZE``).
        node_rank / num_nodes: this node's rank and the node count (``GROUP_RANK`` / ``GROUP_WORLD_SIZE``,
            assigned by the rendezvous).
        owns_group: this runtime joined the process group, so :func:`shutdown_runtime` leaves it (a runtime
            opened inside an already running job, e.g. extraction called by curation, leaves it alone).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Global rank 0 (on node 0) writes logs, metrics, job files, artifacts and checkpoints."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: one process per node, for work each node needs once (node-local files)."""
        return self.local_rank == 0

    def describe(self) -> str:
        """``rank 2 of 4 (node 1 of 2, local rank 0 of 2)``: where this process sits in the job."""
        return (f"rank {self.rank} of {self.world_size} (node {self.node_rank} of {self.num_nodes}, "
                f"local rank {self.local_rank} of {self.local_world_size})")

    @property
    def distributed(self) -> bool:
        """A process group with several ranks is active."""
        return self.world_size > 1


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; explicit names are checked.

    A bare ``cuda`` becomes ``cuda:<local_rank>`` so that each torchrun rank takes its own GPU.

    Raises:
        ConfigError: a malformed device name, or a CUDA device without CUDA.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {name!r}: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r} requested but no CUDA GPU is available (use device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} does not exist: this node has {torch.cuda.device_count()} GPU(s) "
                              "(torchrun --nproc-per-node must not exceed the GPUs of one node)")
    return device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from err


def read_topology() -> dict[str, int]:
    """Global, local and node ranks from torchrun's environment, checked against each other.

    Without ``LOCAL_WORLD_SIZE`` / ``GROUP_*`` (a launcher that only sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)
    the job is taken to be one node.
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    node_rank = _env_int("GROUP_RANK", 0)
    num_nodes = _env_int("GROUP_WORLD_SIZE", max(1, world // max(1, local_world)))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    if not 0 <= local_rank < local_world <= world:
        raise ConfigError(f"LOCAL_RANK {local_rank} / LOCAL_WORLD_SIZE {local_world} do not fit WORLD_SIZE {world}")
    if not 0 <= node_rank < num_nodes:
        raise ConfigError(f"GROUP_RANK {node_rank} is outside GROUP_WORLD_SIZE {num_nodes}")
    return {"rank": rank, "world_size": world, "local_rank": local_rank, "local_world_size": local_world,
            "node_rank": node_rank, "num_nodes": num_nodes}


def init_runtime(device: str | torch.device, *, threads: int | None = None) -> Runtime:
    """Read torchrun's ranks (global, local, node), pick this rank's device, join the process group.

    The group is joined only with several ranks and only when no group is active yet; its backend is
    ``nccl`` on CUDA devices and ``gloo`` otherwise. torchrun (``--standalone`` on one machine, or a c10d
    rendezvous across nodes) sets ``MASTER_ADDR``/``MASTER_PORT``, so the default ``env://`` init is right
    for both.

    Raises:
        ConfigError: malformed or inconsistent rank variables, or a bad device.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    topo = read_topology()
    dev = resolve_device(device, topo["local_rank"])
    owns_group = False
    if topo["world_size"] > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns_group = True
    runtime = Runtime(device=dev, owns_group=owns_group, **topo)
    if owns_group:
        log.info("joined process group (%s): %s on %s", backend, runtime.describe(), dev)
    return runtime


def _sees(marker: Path, wait_s: float) -> bool:
    """Whether ``marker`` exists, looking again for up to ``wait_s`` (network filesystems show files late)."""
    deadline = time.monotonic() + wait_s
    while not marker.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def require_shared_dir(runtime: Runtime, path: Path, what: str, *, wait_s: float = 10.0) -> None:
    """Check that every rank sees the folder ``path`` (created by rank 0), i.e. a shared filesystem.

    Jobs over several nodes keep their state in one folder (checkpoints, job files, per-unit outputs that
    rank 0 merges); on node-local disks each node would silently see a different run. Rank 0 drops a
    uniquely named marker, every rank looks for it (for up to ``wait_s``), and all ranks fail together, so no
    rank is left waiting in a collective. A no-op on a single node, whose ranks share its disk.

    Raises:
        DataError: rank 0 cannot write there, or some ranks cannot see the marker (the error names them).
    """
    if runtime.num_nodes <= 1 or not dist.is_initialized():
        return
    name = [""]
    if runtime.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            name[0] = f".shared-check-{secrets.token_hex(8)}"
            (path / name[0]).touch()
        except OSError as err:
            name[0] = f"!{err}"  # told to every rank, so that all of them raise
    dist.broadcast_object_list(name, src=0)
    if name[0].startswith("!"):
        raise DataError(f"{what} {path} cannot be written by rank 0: {name[0][1:]}")
    seen: list[object] = [None] * runtime.world_size
    dist.all_gather_object(seen, _sees(path / name[0], wait_s))
    if runtime.is_main:
        (path / name[0]).unlink()
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise DataError(f"{what} {path} is not shared between the nodes: ranks {blind} cannot see what rank 0 "
                        "wrote there (put it on a filesystem every node mounts at the same path)")


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()


# The handle of each process's last barrier, kept until the interpreter exits (see ``shutdown_runtime``).
_LAST_BARRIER: list[dist.Work] = []


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group if this runtime joined it, after a last barrier.

    Why the last barrier's handle is kept: a gloo barrier holds weak references to the collectives still in
    flight when it was issued (e.g. FSDP all-gathers of an export), and freeing it frees their tensors. If a
    gloo worker thread drops the last reference, it must take the GIL to free them; when that happens after the
    main thread has begun interpreter shutdown, CPython ends the worker thread and the process aborts
    ("terminate called without an active exception", seen about once in 60 two-process runs on 2 busy cores;
    gdb: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherCoalescedWork`` ->
    ``gil_scoped_acquire``). Holding the handle here makes the main thread the last owner, so the chain is
    freed by the main thread at exit and the worker threads are idle by then.
    """
    if runtime.owns_group and dist.is_initialized():
        work = dist.barrier(async_op=True)
        work.wait()
        _LAST_BARRIER.append(work)
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all ranks alike: models start identical everywhere)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
