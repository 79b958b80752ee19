"""Per-parameter optimizer multipliers of the official recipe, fused into AdamW parameter groups.

The rule (official ``get_params_groups_with_decay`` + ``fuse_params_groups``), applied to each student
sub-module separately (``backbone``, ``dino_head``, ``ibot_head``), in that order:

* **lr multiplier** ``decay ** (L + 1 - layer_id)`` in a module with ``blocks`` (the backbone, L blocks):
  layer 0 for ``cls_token``, ``pos_embed``, registers, ``mask_token`` and ``patch_embed.*``; ``i + 1`` for
  ``blocks.i.*``; ``L + 1`` for the rest (final norm). Heads get 1. ``patch_embed.*`` (bias included) is also
  multiplied by ``patch_embed_lr_mult``.
* **wd multiplier** 0 for names ending in ``.bias`` or containing ``norm`` or ``gamma``, else 1 (so tokens,
  ``pos_embed`` and the last layer's ``weight_g/v`` *are* decayed).
* **is_last_layer** for names containing ``last_layer``: they follow the last-layer lr schedule (zero during
  the first epoch).

Parameters with equal ``(lr_multiplier, wd_multiplier, is_last_layer)`` inside one sub-module share a group,
in order of first appearance. Frozen parameters (``requires_grad=False``) are left out. The optimizer over these
groups, and how schedule values become each group's lr and weight decay, live in :mod:`dinoforge.pretrain.optim`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

_LAYER0_NAMES = ("cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token", "patch_embed")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Wrapper infixes that must not change a parameter's identity (DDP, FSDP1, torch.compile, checkpointing).
_WRAPPER_RE = re.compile(r"(?:^|(?<=\.))(?:module|_fsdp_wrapped_module|_orig_mod|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    """Strip DDP / FSDP / compile / checkpoint wrapper components from a parameter name."""
    return _WRAPPER_RE.sub("", name)


def num_blocks(module: nn.Module) -> int:
    """Transformer depth L of a backbone-like module (0 for heads)."""
    blocks = getattr(module, "blocks", None)
    return len(blocks) if blocks is not None else 0


def layer_id(name: str, n_blocks: int) -> int:
    """Layer index of a parameter for layer-wise lr decay (see the module docstring)."""
    if any(token in name for token in _LAYER0_NAMES):
        return 0
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) + 1 if match else n_blocks + 1


def param_multipliers(name: str, n_blocks: int, *, layerwise_decay: float,
                      patch_embed_lr_mult: float) -> dict[str, Any]:
    """``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer`` of one parameter.

    Args:
        name: parameter name inside its sub-module (``blocks.3.attn.qkv.weight``, ``last_layer.weight_g``).
        n_blocks: L of the sub-module (0 for heads, which makes every lr multiplier 1).
        layerwise_decay: per-layer lr decay rate.
        patch_embed_lr_mult: extra lr factor of ``patch_embed.*``.
    """
    lr_mult = 1.0
    if n_blocks > 0:
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return {"lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_decay else 1.0,
            "is_last_layer": "last_layer" in name}


def submodule_param_groups(module: nn.Module, *, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                           prefix: str = "") -> list[dict[str, Any]]:
    """Fused groups of one sub-module (in first-appearance order).

    Each group holds ``params``, ``names`` (``prefix + name``), ``lr_multiplier``, ``wd_multiplier``,
    ``is_last_layer``.
    """
    n_blocks = num_blocks(module)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)
        mult = param_multipliers(name, n_blocks, layerwise_decay=layerwise_decay,
                                 patch_embed_lr_mult=patch_embed_lr_mult)
        key = (mult["lr_multiplier"], mult["wd_multiplier"], mult["is_last_layer"])
        group = groups.setdefault(key, {"params": [], "names": [], **mult})
        group["params"].append(param)
        group["names"].append(prefix + name)
    return list(groups.values())


def param_groups(student: Mapping[str, nn.Module], *, layerwise_decay: float = 0.9,
                 patch_embed_lr_mult: float = 0.2) -> list[dict[str, Any]]:
    """AdamW parameter groups of a student ``{"backbone": ..., "dino_head": ..., "ibot_head": ...}``.

    Args:
        student: sub-modules in order (an ``nn.ModuleDict`` keeps insertion order).
        layerwise_decay: per-layer lr decay (official 0.9; 1.0 disables it).
        patch_embed_lr_mult: patch-embedding lr factor (official 0.2).

    Returns:
        Groups for ``torch.optim.AdamW``; names are ``<submodule>.<name>``.
    """
    groups: list[dict[str, Any]] = []
    for key, module in student.items():
        groups += submodule_param_groups(module, layerwise_decay=layerwise_decay,
                                         patch_embed_lr_mult=patch_embed_lr_mult, prefix=f"{key}.")
    return groups


def iter_group_names(groups: Iterable[Mapping[str, Any]]) -> Iterable[tuple[int, str]]:
    """``(group index, parameter name)`` for every parameter of ``groups``."""
    for index, group in enumerate(groups):
        for name in group["names"]:
            yield index, name
