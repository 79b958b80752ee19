"""Rank discovery for extraction jobs launched with ``torchrun`` (or any launcher setting the env vars).

Ranks only share the output folder: each one writes its own units, so the process group is needed just
for barriers (rank 0 writes the job file first, and merges the per-unit tables once everyone is done).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinoforge.core.errors import ConfigError


@dataclass
class RankInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the job file and the merged index."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from err


def init_ranks(device: str) -> RankInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group when there are several ranks.

    The backend is ``nccl`` for CUDA devices and ``gloo`` otherwise (CPU jobs, tests).
    """
    info = RankInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if not 0 <= info.rank < info.world_size:
        raise ConfigError(f"RANK {info.rank} is outside WORLD_SIZE {info.world_size}")
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        info.owns_group = True
    return info


def rank_device(device: str, info: RankInfo) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` in multi-rank jobs; anything else is kept."""
    if device == "cuda" and info.world_size > 1:
        return f"cuda:{info.local_rank}"
    return device


def barrier(info: RankInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def finish(info: RankInfo) -> None:
    """Leave the process group if this job created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
