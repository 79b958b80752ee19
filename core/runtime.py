"""The process runtime of every multi-process job: device choice, process group (torchrun), barriers, seeding.

Pretraining, distillation, extraction and curation run the same on one CPU process, one GPU, or
``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on GPUs). A device is a choice, never an assumption:
``auto`` takes this rank's GPU when CUDA is there, anything else is checked.
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
    """Where this process runs.

    Attributes:
        device: this rank's device.
        rank / world_size / local_rank: from torchrun's environment (``0 / 1 / 0`` for a plain process).
        owns_group: this runtime joined the process group, so :func:`shutdown_runtime` leaves it (a runtime
            opened inside an already running job, e.g. extraction called by curation, leaves it alone).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, job files, artifacts and checkpoints."""
        return self.rank == 0

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
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {name!r}: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r} requested but no CUDA GPU is available (use device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from err


def init_runtime(device: str | torch.device, *, threads: int | None = None) -> Runtime:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, pick the device, join the process group.

    The group is joined only with several ranks and only when no group is active yet; its backend is
    ``nccl`` on CUDA devices and ``gloo`` otherwise.

    Raises:
        ConfigError: malformed rank variables or a bad device.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    dev = resolve_device(device, local_rank)
    owns_group = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns_group = True
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank, owns_group=owns_group)


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
