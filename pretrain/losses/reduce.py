"""Collective helpers for the teacher statistics: identity without a process group.

The official code calls ``all_reduce`` unconditionally in one place (the iBOT Sinkhorn-Knopp count) and so
fails without an initialised group; here every collective is a no-op when no group exists, so single-process
training (CPU, one GPU, tests) needs no setup.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity without a process group) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_count(count: int, device: torch.device | None = None) -> int:
    """Sum an integer over ranks (e.g. the masked-token count that Sinkhorn-Knopp normalises by)."""
    if not is_distributed():
        return int(count)
    total = torch.tensor([count], dtype=torch.long, device=device)
    return int(all_reduce_sum_(total).item())
