"""Apply activation checkpointing, ``torch.compile`` and data parallelism to an SSL meta-architecture.

Like torchtitan, parallelism is applied from the outside, after the model is built, in one fixed order:

1. **activation checkpointing**: the student backbone recomputes each block in backward
   (``set_grad_checkpointing``; the list path checkpoints per block);
2. **compile**: each student block's ``forward_list`` (the list path the student uses for forward and
   backward) is replaced by ``torch.compile`` of it; per-block compilation keeps compile time flat in depth
   and composes with FSDP's per-block hooks. The teacher's (forward-only) pass stays eager;
3. **data parallelism**:

   * ``fsdp``: FSDP2 ``fully_shard`` on every block, then on each backbone and head (student *and*
     teacher, the same way, so the teacher EMA is a purely local update of matching shards). The list
     entry points (``forward_dino_list``, ``forward_dino``, block ``forward_list``) are registered with
     ``register_fsdp_forward_method`` so they all-gather like ``forward`` does.
   * ``ddp``: each student sub-module is replaced by a :class:`DDPModule` proxy whose entry points call
     through the ``DistributedDataParallel`` wrapper (DDP only synchronises gradients of calls that go
     through its ``forward``). The teacher stays a plain replicated module: identical student updates on
     every rank keep the EMA identical.

The unwrapped modules stay reachable (:attr:`Parallelized.raw_student`) for checkpoints and parameter groups.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import ConfigError

log = logging.getLogger(__name__)

Strategy = Literal["auto", "none", "ddp", "fsdp"]
_BACKBONE_METHODS = ("forward_dino_list", "forward_dino", "forward_features")


class ParallelConfig(StrictModel):
    """How the model is distributed and accelerated."""

    strategy: Strategy = Field("auto", description="auto = none for one process, fsdp under torchrun")
    activation_checkpointing: bool = False
    compile: bool = False
    reshard_after_forward: bool = True
    meta_init: bool = Field(True, description="fsdp: build on the meta device, shard, then initialise each shard "
                            "in place (same weights; no rank ever holds the whole model)")


class _MethodCall(nn.Module):
    """``forward(name, *args)`` -> ``module.name(*args)``: lets DDP wrap a module's non-``forward`` methods."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, method)(*args, **kwargs)


class DDPModule(nn.Module):
    """Stands in for a student sub-module; its ``forward`` and list entry points go through DDP.

    Attributes not defined here (``config``, ``patch_size``, ``norm`` ...) are read from the wrapped module.
    """

    def __init__(self, module: nn.Module, **ddp_kwargs: Any) -> None:
        super().__init__()
        self.ddp = nn.parallel.DistributedDataParallel(_MethodCall(module), **ddp_kwargs)

    @property
    def inner(self) -> nn.Module:
        """The wrapped (unwrapped-from-DDP) module."""
        return self.ddp.module.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp("forward", *args, **kwargs)

    def forward_dino_list(self, *args: Any, **kwargs: Any) -> Any:
        """List path of a backbone, through DDP."""
        return self.ddp("forward_dino_list", *args, **kwargs)

    def forward_dino(self, *args: Any, **kwargs: Any) -> Any:
        """Single-tensor DINO path of a backbone, through DDP."""
        return self.ddp("forward_dino", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "ddp":  # not built yet (or being unpickled): no inner module to ask
                raise
            return getattr(self.inner, name)


@dataclass
class Parallelized:
    """What :func:`parallelize` did."""

    strategy: str
    raw_student: nn.ModuleDict
    raw_teacher: nn.ModuleDict


def resolve_strategy(cfg: ParallelConfig, world_size: int) -> str:
    """``auto`` -> ``none`` for one process, else ``fsdp``; ``ddp``/``fsdp`` need a process group."""
    if cfg.strategy == "auto":
        return "none" if world_size == 1 else "fsdp"
    if cfg.strategy in ("ddp", "fsdp") and not dist.is_initialized():
        raise ConfigError(f"parallel.strategy={cfg.strategy} needs torchrun (no process group is initialised)")
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError("parallel.strategy=none cannot run under torchrun with several processes")
    return cfg.strategy


def _compile_blocks(backbone: nn.Module) -> None:
    for block in backbone.blocks:
        block.forward_list = torch.compile(block.forward_list)


def _fully_shard(module: nn.Module, reshard: bool) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if hasattr(module, "blocks"):
        for block in module.blocks:
            fully_shard(block, reshard_after_forward=reshard)
            register_fsdp_forward_method(block, "forward_list")
    fully_shard(module, reshard_after_forward=reshard)
    for name in _BACKBONE_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)


def parallelize(meta: nn.Module, cfg: ParallelConfig, *, world_size: int = 1,
                device: torch.device | None = None) -> Parallelized:
    """Apply AC -> compile -> FSDP2 / DDP to ``meta.student`` and ``meta.teacher`` in place.

    Args:
        meta: an ``SSLMetaArch`` (``student`` / ``teacher`` ``ModuleDict`` s of backbone and heads), already on
            its device, with identical initial weights on every rank.
        cfg: what to apply.
        world_size: number of processes.
        device: the device of this rank (DDP ``device_ids``).
    """
    strategy = resolve_strategy(cfg, world_size)
    raw_student = nn.ModuleDict(dict(meta.student.items()))
    raw_teacher = nn.ModuleDict(dict(meta.teacher.items()))
    if cfg.activation_checkpointing:
        meta.student["backbone"].set_grad_checkpointing(True)
    if cfg.compile:
        _compile_blocks(meta.student["backbone"])
    if strategy == "fsdp":
        # The backbone returns views (``x_norm[:, 0]``); nothing in the recipe modifies them in place, which is
        # the only case FSDP2's warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for tree in (meta.student, meta.teacher):
            for module in tree.values():
                _fully_shard(module, cfg.reshard_after_forward)
    elif strategy == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        for name, module in list(meta.student.items()):
            meta.student[name] = DDPModule(module, device_ids=ids)
    log.info("parallelize: strategy=%s activation_checkpointing=%s compile=%s", strategy,
             cfg.activation_checkpointing, cfg.compile)
    return Parallelized(strategy=strategy, raw_student=raw_student, raw_teacher=raw_teacher)

