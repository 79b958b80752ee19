"""Bringing the teacher's patch-token grid onto a student's grid (different patch sizes or crop grids).

A teacher with patch 14 sees a 224 px crop as 16 x 16 tokens, a patch-16 student as 14 x 14. Both tile the
same pixels, so the target of student token ``(i, j)`` is built from the teacher tokens that cover the same
pixels:

* ``area`` (default): the average of the teacher tokens weighted by how much of the student cell each one
  covers (exact overlap lengths, separable in height and width). Rows of the weight matrices sum to 1, equal
  grids give the identity, and integer down-sampling gives plain block means.
* ``bilinear``: ``F.interpolate`` on the token map (half-pixel centres; antialiased when down-sampling),
  smoother when the student grid is finer than the teacher's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Resample = Literal["area", "bilinear"]


def overlap_weights(n_out: int, n_in: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """Area weights from ``n_in`` equal cells onto ``n_out`` equal cells of the same interval.

    Args:
        n_out: number of target cells.
        n_in: number of source cells.

    Returns:
        ``[n_out, n_in]``; entry ``(i, k)`` is the fraction of target cell ``i`` covered by source cell ``k``
        (each row sums to 1). Computed exactly on the integer grid of ``n_out * n_in`` units.
    """
    if n_out <= 0 or n_in <= 0:
        raise ValueError(f"grid sizes must be positive, got {n_out} and {n_in}")
    out_start = torch.arange(n_out, device=device)[:, None] * n_in  # [n_out, 1] in units of 1/(n_out*n_in)
    in_start = torch.arange(n_in, device=device)[None, :] * n_out  # [1, n_in]
    overlap = (torch.minimum(out_start + n_in, in_start + n_out) - torch.maximum(out_start, in_start)).clamp(min=0)
    return (overlap.to(torch.float64) / n_in).to(dtype)  # [n_out, n_in]


def resample_tokens(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int],
                    mode: Resample = "area") -> torch.Tensor:
    """Resample row-major patch tokens from grid ``src`` to grid ``dst``.

    Args:
        tokens: ``[B, h_src * w_src, D]`` (registers and CLS excluded).
        src: ``(h_src, w_src)``.
        dst: ``(h_dst, w_dst)``.
        mode: ``area`` or ``bilinear`` (see the module docstring).

    Returns:
        ``[B, h_dst * w_dst, D]`` (the input itself when the grids are equal).
    """
    batch, n_tokens, dim = tokens.shape
    if n_tokens != src[0] * src[1]:
        raise ValueError(f"{n_tokens} tokens do not form a {src[0]}x{src[1]} grid")
    if tuple(src) == tuple(dst):
        return tokens
    grid = tokens.reshape(batch, src[0], src[1], dim)  # [B, h, w, D]
    if mode == "area":
        wh = overlap_weights(dst[0], src[0], dtype=tokens.dtype, device=tokens.device)  # [H, h]
        ww = overlap_weights(dst[1], src[1], dtype=tokens.dtype, device=tokens.device)  # [W, w]
        out = torch.einsum("ik,bkld,jl->bijd", wh, grid, ww)  # [B, H, W, D]
    elif mode == "bilinear":
        shrink = dst[0] < src[0] or dst[1] < src[1]
        out = F.interpolate(grid.permute(0, 3, 1, 2), size=tuple(dst), mode="bilinear", align_corners=False,
                            antialias=shrink).permute(0, 2, 3, 1)  # [B, H, W, D]
    else:
        raise ValueError(f"unknown grid resampling {mode!r} (area, bilinear)")
    return out.reshape(batch, dst[0] * dst[1], dim)


def token_grid(image_hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of an image of ``image_hw`` pixels (the backbone drops incomplete patches)."""
    return image_hw[0] // patch_size, image_hw[1] // patch_size
