"""Post-processing shared by every backend: pooling, truncation and normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["cls", "mean", "cls+mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class PoolingOptions:
    """How token features become one vector per image.

    Attributes:
        pooling: ``cls`` token, ``mean`` of the patch tokens (registers excluded), or both concatenated.
        normalize: L2-normalise the (truncated) vector.
        dimensions: keep only the first ``dimensions`` entries (OpenAI's ``dimensions``), before normalising.
    """

    pooling: Pooling = "cls"
    normalize: bool = True
    dimensions: int | None = None


def pooled_dim(embed_dim: int, pooling: str) -> int:
    """Width of a pooled vector before truncation."""
    return 2 * embed_dim if pooling == "cls+mean" else embed_dim


def pool(cls: torch.Tensor, mean: torch.Tensor, options: PoolingOptions) -> torch.Tensor:
    """Pool backbone outputs into embeddings.

    Args:
        cls: ``[B, D]`` final-LayerNorm class tokens.
        mean: ``[B, D]`` mean of the final-LayerNorm patch tokens.
        options: pooling, truncation and normalisation.

    Returns:
        float32 ``[B, D']`` with ``D' = dimensions or pooled_dim(D, pooling)``.
    """
    if options.pooling == "cls":
        out = cls
    elif options.pooling == "mean":
        out = mean
    elif options.pooling == "cls+mean":
        out = torch.cat([cls, mean], dim=-1)  # [B, 2D]
    else:
        raise ValueError(f"unknown pooling {options.pooling!r}; expected one of {POOLINGS}")
    out = out.float()
    if options.dimensions is not None:
        out = out[:, : options.dimensions]
    if options.normalize:
        out = F.normalize(out, dim=-1)
    return out
