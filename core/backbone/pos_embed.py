"""Position-embedding resampling exactly as the official DINOv2 code does it.

The official models use two modes, and they give different numbers from timm's ``resample_abs_pos_embed``
at every size but the training one:

* **offset mode** (non-register models, ``interpolate_offset=0.1``): bicubic with a *scale factor*
  ``(h + 0.1) / M`` instead of a size, no antialias. The output is still ``h x w`` but the source
  coordinates follow the (slightly larger) scale factor.
* **size mode** (register models, ``interpolate_offset=0``): bicubic to ``size=(h, w)`` with antialias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    offset: float,
    antialias: bool,
) -> torch.Tensor:
    """Resample a ``[1, 1 + M*M, D]`` position embedding (class position first) to a target grid.

    Args:
        pos_embed: ``[1, 1 + M*M, D]`` learned embedding; row 0 is the class position, never resampled.
        grid_hw: target patch grid ``(h, w)``; the first entry is the height axis.
        offset: official ``interpolate_offset``; non-zero selects the scale-factor mode.
        antialias: official ``interpolate_antialias`` (used by the register models).

    Returns:
        ``[1, 1 + h*w, D]`` in the dtype of ``pos_embed``; the input itself when ``(h, w) == (M, M)``.
    """
    n_patches = pos_embed.shape[1] - 1
    side = int(math.sqrt(n_patches))
    if side * side != n_patches:
        raise ValueError(f"position embedding holds {n_patches} patch positions, not a square grid")
    h, w = grid_hw
    if h == side and w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        scale = ((h + offset) / side, (w + offset) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=antialias)
    if patch_pos.shape[-2:] != (h, w):  # scale-factor rounding can only drift by one at extreme sizes
        raise ValueError(f"position embedding resampled to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # [1, h*w, D]
    return torch.cat([pos_embed[:, :1].float(), patch_pos], dim=1).to(dtype)


def resample_pos_embed_param(pos_embed: torch.Tensor, new_grid: int, *, offset: float,
                             antialias: bool) -> torch.Tensor:
    """Return a new stored embedding for a model retrained at another size (high-resolution adaptation)."""
    return interpolate_pos_embed(pos_embed, (new_grid, new_grid), offset=offset, antialias=antialias).clone()
