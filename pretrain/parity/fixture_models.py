"""Build dinoforge models and batches from the ``config/*`` and per-step keys of a train-step fixture."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from dinoforge.core.backbone import BackboneConfig
from dinoforge.core.backbone.convert import dinoforge_to_official, to_dinoforge
from dinoforge.core.errors import DataError
from dinoforge.pretrain.masking import Batch
from dinoforge.pretrain.meta_arch import HeadShape, MetaArchConfig, SSLMetaArch

_SUBMODULES = ("backbone", "dino_head", "ibot_head")


def config_value(fixture: Mapping[str, Any], key: str) -> Any:
    """``config/<key>`` with a clear error when the file lacks it."""
    full = f"config/{key}"
    if full not in fixture:
        raise DataError(f"fixture has no {full!r}")
    return fixture[full]


def meta_arch_config(fixture: Mapping[str, Any], *, drop_path_rate: float | None = None,
                     drop_path_uniform: bool = True) -> MetaArchConfig:
    """The :class:`MetaArchConfig` a train-step fixture was generated with."""
    c = functools.partial(config_value, fixture)
    backbone = BackboneConfig(
        embed_dim=int(c("embed_dim")), depth=int(c("depth")), num_heads=int(c("num_heads")),
        patch_size=int(c("patch_size")), img_size=int(c("global_crops_size")), mlp_ratio=float(c("mlp_ratio")),
        num_register_tokens=int(fixture.get("config/num_register_tokens", 0)),
        layerscale_init=float(c("layerscale_arg")), interpolate_offset=float(c("interpolate_offset")),
        interpolate_antialias=bool(c("interpolate_antialias")),
        drop_path_rate=float(c("drop_path_rate") if drop_path_rate is None else drop_path_rate),
        drop_path_uniform=drop_path_uniform,
    )
    dims = {"hidden_dim": int(c("head_hidden_dim")), "bottleneck_dim": int(c("head_bottleneck_dim")),
            "nlayers": int(c("head_nlayers"))}
    return MetaArchConfig(
        backbone=backbone, dino_head=HeadShape(out_dim=int(c("dino_K")), **dims),
        ibot_head=HeadShape(out_dim=int(c("ibot_K")), **dims), ibot_separate_head=bool(c("ibot_separate_head")),
        centering=str(c("centering")), dino_loss_weight=float(c("dino_loss_weight")),
        ibot_loss_weight=float(c("ibot_loss_weight")), koleo_loss_weight=float(c("koleo_loss_weight")),
    )


def split_official_names(names: list[str]) -> dict[str, list[str]]:
    """``backbone.x`` / ``dino_head.x`` / ``ibot_head.x`` official names grouped by sub-module."""
    groups: dict[str, list[str]] = {}
    for name in names:
        sub, _, rest = name.partition(".")
        if sub not in _SUBMODULES:
            raise DataError(f"parameter {name!r} is not under backbone/dino_head/ibot_head")
        groups.setdefault(sub, []).append(rest)
    return groups


def load_official_student(model: SSLMetaArch, fixture: Mapping[str, Any], prefix: str = "student_init/") -> None:
    """Load official-named student weights into student *and* teacher (the teacher starts as a copy)."""
    for tree in (model.student, model.teacher):
        load_official_tree(tree, fixture, prefix)


def load_official_tree(tree: torch.nn.ModuleDict, fixture: Mapping[str, Any], prefix: str) -> None:
    """Load the official-named tensors ``<prefix><sub>.<name>`` into one student/teacher tree."""
    names = list(fixture["student_param_names"])
    for sub, subnames in split_official_names(names).items():
        state = {n: fixture[f"{prefix}{sub}.{n}"] for n in subnames}
        if sub == "backbone":
            state = to_dinoforge(state, source="official")
        target = tree[sub].state_dict()
        missing = set(target) - set(state)
        if missing:
            raise DataError(f"fixture lacks {sub} tensors {sorted(missing)[:3]}")
        tree[sub].load_state_dict({k: state[k] for k in target})


def official_name_map(module_tree: torch.nn.ModuleDict) -> dict[str, str]:
    """``<sub>.<dinoforge name>`` -> ``<sub>.<official name>`` for every parameter of a student/teacher tree."""
    out: dict[str, str] = {}
    for sub, module in module_tree.items():
        params = dict(module.named_parameters())
        # Renaming needs the whole backbone (SwiGLU is recognised from fc1/fc2 shapes); dict order is kept.
        renamed = list(dinoforge_to_official(params)) if sub == "backbone" else list(params)
        out.update({f"{sub}.{ours}": f"{sub}.{official}" for ours, official in zip(params, renamed, strict=True)})
    return out


def official_named(module_tree: torch.nn.ModuleDict, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) of a student/teacher tree under official ``<sub>.<name>`` names."""
    out: dict[str, torch.Tensor] = {}
    for sub, module in module_tree.items():
        tensors = {n: (p.grad if grads else p.detach()) for n, p in module.named_parameters()}
        if sub == "backbone":
            tensors = dinoforge_to_official(tensors)
        out.update({f"{sub}.{n}": t for n, t in tensors.items()})
    return out


def step_batch(fixture: Mapping[str, Any], step: str) -> Batch:
    """The collated batch stored under ``<step>/``."""
    return Batch(global_crops=fixture[f"{step}/global_crops"], local_crops=fixture[f"{step}/local_crops"],
                 masks=fixture[f"{step}/masks"], mask_indices=fixture[f"{step}/mask_indices"],
                 masks_weight=fixture[f"{step}/masks_weight"],
                 n_masked_patches=int(fixture[f"{step}/n_masked_patches"]),
                 upperbound=int(fixture[f"{step}/upperbound"]))
