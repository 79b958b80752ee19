"""Sharded initialisation: build on the ``meta`` device, ``fully_shard``, then initialise each shard in place.

An ordinary build materialises the student and the teacher whole on every rank before FSDP2 shards them: a
ViT-g/14 meta-architecture is ~9 GB of fp32 per rank before a single step. Here the modules are built on the
``meta`` device (no memory, no random draws), sharded by :func:`~dinoforge.pretrain.parallelize.parallelize`,
allocated shard by shard with ``to_empty``, and only then given their values.

**Same weights as an ordinary build with the same seed.** While the meta modules are built, a dispatch mode
records every random draw and every in-place write (``uniform_``, ``erfinv_``, ``fill_``, ``copy_`` ...) in
the order the ordinary build performs them. Replaying that log on the CPU reproduces the ordinary build's
random stream exactly: each parameter's full tensor is materialised only from its last overwriting write to
its last write (one parameter at a time), its local shard is copied out and the full tensor dropped; draws
whose values end up unused (``nn.Linear``'s construction-time init that timm then overwrites, the teacher's
own init before it copies the student) are replayed into a scratch tensor, only to advance the generator. The
teacher's ``copy_`` of a finished student parameter becomes a local shard-to-shard copy. Peak memory is the
shards plus one full parameter, and the global generator ends in the state the ordinary build leaves (the
stochastic-depth draws of training then match too). Writes to part of a parameter (timm's SwiGLU init sets
half of ``fc1``) are replayed on the same view of the full tensor. Any write the replay cannot reproduce (a
value computed from a non-parameter tensor, a parameter that is never written whole) raises
:class:`MetaInitError` instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from dinoforge.core.errors import ConfigError
from dinoforge.pretrain.meta_arch import MetaArchConfig, SSLMetaArch, build_student, ema_teacher_from
from dinoforge.pretrain.parallelize import ParallelConfig, Parallelized, parallelize, resolve_strategy

log = logging.getLogger(__name__)
_WRITES_ALL = {"fill_", "zero_", "copy_"}  # in-place ops that set every element whatever it held


class MetaInitError(ConfigError):
    """The model's construction does something a meta-device build cannot replay."""


@dataclass
class _Event:
    """One recorded op: ``func(*args, **kwargs)`` on meta tensors."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    random: bool  # consumes the generator
    inplace: bool  # writes its first argument

    @property
    def overwrites(self) -> bool:
        """Sets every element of its target (a random fill or a constant / copy)."""
        return self.inplace and (self.random or self.func._schema.name.split("::")[-1] in _WRITES_ALL)


class InitRecorder(TorchDispatchMode):
    """Records random draws and in-place writes (the args are kept: their meta storages identify targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[_Event] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        random = torch.Tag.nondeterministic_seeded in func.tags
        inplace = func._schema.name.endswith("_") and bool(args) and isinstance(args[0], torch.Tensor)
        if random or inplace:
            self.events.append(_Event(func, args, kwargs, random=random, inplace=inplace))
        return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class _Target:
    """A parameter or buffer of the sharded modules, by its pre-shard meta tensor."""

    name: str
    meta: torch.Tensor  # [*shape] on meta: shape, stride, dtype of the full tensor
    get: Callable[[], torch.Tensor]  # the (possibly DTensor) tensor after sharding and to_empty

    def covers(self, t: torch.Tensor) -> bool:
        """``t`` is the whole tensor (not a view of part of it)."""
        return (t.shape == self.meta.shape and t.stride() == self.meta.stride()
                and t.storage_offset() == self.meta.storage_offset())

    def view_of(self, full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The part of ``full`` (laid out like :attr:`meta`) that the meta view ``t`` of this target covers."""
        if self.covers(t):
            return full
        return full.as_strided(t.shape, t.stride(), t.storage_offset() - self.meta.storage_offset())

    def local(self) -> torch.Tensor:
        value = self.get()
        return value.to_local() if isinstance(value, DTensor) else value

    def write(self, full: torch.Tensor) -> None:
        """Copy this rank's part of the full CPU tensor into the sharded tensor."""
        value = self.get()
        part = distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None).to_local() \
            if isinstance(value, DTensor) else full
        with torch.no_grad():
            self.local().copy_(part)


def targets_of(trees: dict[str, nn.Module]) -> dict[int, _Target]:
    """Every parameter and buffer of the named module trees, keyed by its (meta) storage: what replay fills."""
    found: dict[int, _Target] = {}
    for tree_name, tree in trees.items():
        for kind, named in (("param", tree.named_parameters()), ("buffer", tree.named_buffers())):
            for fqn, tensor in named:
                getter = tree.get_parameter if kind == "param" else tree.get_buffer
                found[_key(tensor)] = _Target(f"{tree_name}.{fqn}", tensor, lambda g=getter, n=fqn: g(n))
    return found


def _scratch_draw(event: _Event) -> None:
    """Advance the CPU generator exactly as ``event`` did, into a throw-away tensor."""
    if event.inplace:
        meta = event.args[0]
        scratch = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
        event.func(scratch, *event.args[1:], **event.kwargs)
        return
    if any(isinstance(a, torch.Tensor) for a in event.args):
        raise MetaInitError(f"meta init cannot replay {event.func} (a random op reading tensor values)")
    event.func(*event.args, **{**event.kwargs, "device": torch.device("cpu")})


@dataclass
class _Plan:
    """Per target: the index of its last overwriting write and of its last write."""

    last_overwrite: dict[int, int]
    last_write: dict[int, int]


def _plan(events: list[_Event], targets: dict[int, _Target]) -> _Plan:
    last_overwrite: dict[int, int] = {}
    last_write: dict[int, int] = {}
    for i, event in enumerate(events):
        if not event.inplace or (key := _key(event.args[0])) not in targets:
            continue
        last_write[key] = i
        if event.overwrites and targets[key].covers(event.args[0]):  # a write to a view keeps the rest
            last_overwrite[key] = i
    missing = [t.name for k, t in targets.items() if k not in last_overwrite]
    if missing:
        raise MetaInitError(f"meta init: {missing[:5]} are never written in place at construction (created from "
                            "a computed tensor?); build them with torch.empty and an nn.init function")
    return _Plan(last_overwrite, last_write)


def _substitute(event: _Event, live: dict[int, torch.Tensor], targets: dict[int, _Target]) -> tuple[Any, ...]:
    """The event's args with every meta tensor replaced by the live full tensor it stands for."""

    def swap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        key = _key(value)
        if key in live:
            return targets[key].view_of(live[key], value)
        what = targets[key].name if key in targets else "a tensor that is not a parameter"
        raise MetaInitError(f"meta init cannot replay {event.func}: it reads {what}, whose value is not at hand")

    return tuple(tree_map(swap, list(event.args)))


def _alias_source(event: _Event, targets: dict[int, _Target]) -> int | None:
    """The target a whole-tensor ``copy_`` reads (the teacher copying a student parameter), else None."""
    if event.func._schema.name != "aten::copy_" or len(event.args) < 2:
        return None
    key = _key(event.args[1])
    return key if key in targets and targets[key].covers(event.args[1]) else None


def replay(events: list[_Event], targets: dict[int, _Target]) -> None:
    """Re-run a recorded construction on the CPU generator and fill each target's local shard (see module doc)."""
    plan = _plan(events, targets)
    live: dict[int, torch.Tensor] = {}  # full [*shape] CPU tensors of the targets being written now
    done: set[int] = set()
    aliases: list[tuple[int, int]] = []
    for i, event in enumerate(events):
        key = _key(event.args[0]) if event.inplace else None
        if key not in targets or i < plan.last_overwrite[key]:
            if event.random:
                _scratch_draw(event)
            continue
        source = _alias_source(event, targets)
        if i == plan.last_overwrite[key] == plan.last_write[key] and source in done:
            aliases.append((key, source))  # final value = a finished target's final value: copy shards later
            continue
        if i == plan.last_overwrite[key]:
            meta = targets[key].meta
            live[key] = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
        with torch.no_grad():
            event.func(*_substitute(event, live, targets), **event.kwargs)
        if i == plan.last_write[key]:
            targets[key].write(live.pop(key))
            done.add(key)
    for key, source in aliases:
        dst, src = targets[key].local(), targets[source].local()
        if dst.shape != src.shape:
            raise MetaInitError(f"{targets[key].name} and {targets[source].name} are sharded differently")
        with torch.no_grad():
            dst.copy_(src)


def build_parallel_meta_arch(config: MetaArchConfig, parallel: ParallelConfig, *, world_size: int,
                             device: torch.device) -> tuple[SSLMetaArch, Parallelized]:
    """The run's meta-architecture, parallelized: sharded meta-device init under FSDP2 (``parallel.meta_init``),
    else an ordinary build (DDP and single processes hold whole models anyway)."""
    if parallel.meta_init and resolve_strategy(parallel, world_size) == "fsdp":
        if config.stem_weights:  # replaying the recorded init would overwrite the loaded stem
            raise ConfigError("model.stem_weights cannot be combined with parallel.meta_init; set "
                              "parallel.meta_init=false (a hybrid stem is small enough to build whole)")
        return build_sharded_meta_arch(config, parallel, world_size=world_size, device=device)
    meta = SSLMetaArch(config).to(device)
    return meta, parallelize(meta, parallel, world_size=world_size, device=device)


def build_sharded_meta_arch(config: MetaArchConfig, parallel: ParallelConfig, *, world_size: int,
                            device: torch.device) -> tuple[SSLMetaArch, Parallelized]:
    """``SSLMetaArch(config)`` built on meta, parallelized (FSDP2), then initialised shard by shard.

    The caller seeds the global generator first, exactly as for an ordinary build; the result holds, on every
    rank, the shards of the weights ``SSLMetaArch(config)`` would have built, and the generator ends in the same
    state.
    """
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        student = build_student(config)
        teacher = ema_teacher_from(student, config)
    targets = targets_of({"student": student, "teacher": teacher})
    meta = SSLMetaArch(config, student=student, teacher=teacher)  # centres are built for real (tiny)
    par = parallelize(meta, parallel, world_size=world_size, device=device)
    for tree in (meta.student, meta.teacher):
        tree.to_empty(device=device)
    meta.to(device)
    replay(recorder.events, targets)
    log.info("meta init: %d recorded ops replayed into %d sharded tensors", len(recorder.events), len(targets))
    return meta, par
