"""Process-level setup: device choice, process group (torchrun), seeding, threads.

The run works the same on one CPU process, one GPU, or ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on
GPUs). A device is a choice (``train.device``), never an assumption.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dinoforge.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, artifacts and checkpoint files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group with several ranks is active."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; explicit names are checked.

    Raises:
        ConfigError: an unknown device or a CUDA device without CUDA.
    """
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device={name!r} is not a device: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but no CUDA GPU is available (use train.device=cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_runtime(device: str, *, threads: int | None = None) -> Runtime:
    """Join the torchrun process group when launched by torchrun, pick the device, set threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank)


# The handle of each process's last barrier, kept until the interpreter exits (see ``shutdown_runtime``).
_LAST_BARRIER: list[dist.Work] = []


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group (if this process joined one).

    Why the last barrier's handle is kept: a gloo barrier holds weak references to the collectives still in
    flight when it was issued (here FSDP all-gathers of the export), and freeing it frees their tensors. If a
    gloo worker thread drops the last reference, it must take the GIL to free them; when that happens after the
    main thread has begun interpreter shutdown, CPython ends the worker thread and the process aborts
    ("terminate called without an active exception", seen about once in 60 two-process runs on 2 busy cores;
    gdb: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherCoalescedWork`` ->
    ``gil_scoped_acquire``). Holding the handle here makes the main thread the last owner, so the chain is
    freed by the main thread at exit and the worker threads are idle by then.
    """
    if runtime.distributed and dist.is_initialized():
        work = dist.barrier(async_op=True)
        work.wait()
        _LAST_BARRIER.append(work)
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all ranks alike: models start identical everywhere)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
