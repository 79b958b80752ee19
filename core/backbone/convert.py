"""State-dict conversion between official DINOv2, timm and dinoforge layouts, and architecture inference.

dinoforge uses timm's parameter names plus ``mask_token`` (``reg_token`` for registers, ``pos_embed`` with the
class position first). Official checkpoints differ in a few names (``register_tokens``, SwiGLU ``w12/w3``,
chunked ``blocks.C.N``), and timm's register models store the position embedding without the class position.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch

from dinoforge.core.backbone.config import ARCHITECTURES, BackboneConfig
from dinoforge.core.errors import CheckpointError

StateDict = dict[str, torch.Tensor]
SourceFormat = Literal["official", "timm", "dinoforge"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "teacher.backbone.", "student.backbone.", "backbone.",
                     "teacher.", "model.")
_CHUNK_RE = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.", "dino_head.", "ibot_head.")


def strip_wrapper_prefix(state: StateDict) -> StateDict:
    """Remove a prefix shared by all backbone keys (DDP ``module.``, teacher checkpoints ``teacher.backbone.``)."""
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix + "patch_embed.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def detect_format(state: StateDict) -> SourceFormat:
    """Guess the naming convention of a backbone state dict."""
    keys = state.keys()
    if "register_tokens" in keys or any(".mlp.w12." in k for k in keys) or any(_CHUNK_RE.match(k) for k in keys):
        return "official"
    if "reg_token" in keys:
        return "dinoforge" if "mask_token" in keys else "timm"
    return "official" if "mask_token" in keys else "timm"


def _unchunk(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        match = _CHUNK_RE.match(key)
        # In a chunked layout, chunk C holds blocks with their *global* index N: blocks.C.N.* -> blocks.N.*
        if match and match.group(3).split(".")[0] in _BLOCK_CHILDREN:
            out[f"blocks.{match.group(2)}.{match.group(3)}"] = value
        else:
            out[key] = value
    return out


_BLOCK_CHILDREN = {"norm1", "attn", "ls1", "norm2", "mlp", "ls2"}


def official_to_dinoforge(state: StateDict) -> StateDict:
    """Rename an official DINOv2 backbone state dict to dinoforge names."""
    out: StateDict = {}
    for key, value in _unchunk(state).items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        if key == "register_tokens":
            key = "reg_token"
        out[key] = value
    return out


def dinoforge_to_official(state: StateDict) -> StateDict:
    """Rename a dinoforge backbone state dict to official names (inverse of :func:`official_to_dinoforge`)."""
    swiglu = any(k.endswith("mlp.fc1.weight") and v.shape[0] == 2 * state[k.replace("fc1", "fc2")].shape[1]
                 for k, v in state.items() if ".mlp.fc1." in k)
    out: StateDict = {}
    for key, value in state.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out["register_tokens" if key == "reg_token" else key] = value
    return out


def timm_to_dinoforge(state: StateDict) -> StateDict:
    """Convert a timm ``VisionTransformer`` state dict: drop the classifier, restore the class position row.

    timm's register models (``no_embed_class``) store ``pos_embed`` for patches only, with the class
    position folded into ``cls_token``; a zero class-position row is equivalent.
    """
    unsupported = [k for k in state if k.startswith(("norm_pre.", "attn_pool.")) or ".q_norm." in k]
    if unsupported:
        raise CheckpointError(f"timm checkpoint uses features dinoforge backbones do not have: {unsupported[:3]}")
    out = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1] and \
            math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    if "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype)
    return out


def to_dinoforge(state: StateDict, source: SourceFormat | None = None) -> StateDict:
    """Normalise any supported backbone state dict to dinoforge names."""
    state = strip_wrapper_prefix(dict(state))
    source = source or detect_format(state)
    if source == "official":
        state = official_to_dinoforge(state)
        if "mask_token" not in state and "cls_token" in state:
            state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1], dtype=state["cls_token"].dtype)
        return state
    if source == "timm":
        return timm_to_dinoforge(state)
    return state


def _require(state: StateDict, key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"state dict has no {key!r}; is this a ViT backbone checkpoint?")
    return state[key]


def _stem_channels(state: StateDict) -> tuple[int, ...]:
    """Widths of a convolutional stem (``patch_embed.stem.{3i}.weight [C_out, C_in, 3, 3]``), or ``()``."""
    convs = sorted(int(k.split(".")[2]) for k in state
                   if k.startswith("patch_embed.stem.") and k.endswith(".weight") and state[k].ndim == 4)
    return tuple(state[f"patch_embed.stem.{i}.weight"].shape[0] for i in convs)


def infer_config(state: StateDict, *, num_heads: int | None = None, patch_size: int | None = None,
                 arch: str | None = None, head_dim: int = 64) -> BackboneConfig:
    """Read a :class:`BackboneConfig` off the tensors of a dinoforge-named state dict.

    Width, depth, registers, pos-embed grid, FFN type and width, LayerScale and biases are read from shapes.
    What tensors cannot tell comes from ``arch`` (a registered name) or overrides: the number of heads
    defaults to ``width / head_dim`` (official head width 64). Models with registers get the official
    register-mode interpolation (size + antialias), others the offset mode.
    """
    base = ARCHITECTURES[arch].model_dump() if arch else {}
    proj = _require(state, "patch_embed.proj.weight")  # [D, C, p, p]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    stem = _stem_channels(state)
    if stem:  # the projection reads the stem's last width; the image channels are the first conv's input
        in_chans = state["patch_embed.stem.0.weight"].shape[1]
    if patch_size is not None and patch_size != patch:
        raise CheckpointError(f"--patch-size {patch_size} contradicts the patch kernel of size {patch}")
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise CheckpointError("state dict has no transformer blocks")
    n_pos = _require(state, "pos_embed").shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise CheckpointError(f"pos_embed has {n_pos} patch positions, not a square grid")
    fc1 = _require(state, "blocks.0.mlp.fc1.weight")
    fc2 = _require(state, "blocks.0.mlp.fc2.weight")
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    reg = state["reg_token"].shape[1] if state.get("reg_token") is not None else 0
    heads = num_heads or base.get("num_heads") or max(dim // head_dim, 1)
    fields = {
        **base, "embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": patch, "in_chans": in_chans,
        "img_size": grid * patch, "ffn": "swiglu" if swiglu else "mlp", "mlp_hidden_dim": fc2.shape[1],
        "mlp_ratio": fc2.shape[1] / dim, "num_register_tokens": reg, "stem_channels": stem,
        "layerscale_init": 1e-5 if "blocks.0.ls1.gamma" in state else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state, "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": "blocks.0.mlp.fc1.bias" in state,
        "interpolate_offset": 0.0 if reg else 0.1, "interpolate_antialias": bool(reg),
    }
    try:
        return BackboneConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"cannot build an architecture from this state dict: {err}") from err


def check_state_dict(state: StateDict, expected: StateDict) -> None:
    """Raise a :class:`CheckpointError` naming missing, unexpected and wrongly-shaped tensors."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})")
    if problems:
        raise CheckpointError("state dict does not fit the architecture: " + "; ".join(problems))
