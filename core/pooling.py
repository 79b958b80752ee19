"""Pooling: how a backbone's final-LayerNorm tokens become one vector per image.

The model card's ``default_pooling`` names one of :data:`POOLINGS`; evaluation, the export parity check and
the server all pool through :func:`pool`, so the vector a card promises is the same everywhere. Every caller
hands over the class token and the *mean* of the patch tokens (an exported graph outputs exactly these two),
so the mean is computed once per batch, not once per pooling.

Torch-free at import: the edge runtime pools numpy arrays with the same function training pools tensors with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from dinoforge.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

Pooling = Literal["cls", "mean", "cls+mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls+mean")


def check_poolings(poolings: Sequence[str]) -> tuple[str, ...]:
    """Validate pooling names (duplicates removed, order kept).

    Raises:
        ConfigError: an empty list or a name outside :data:`POOLINGS`.
    """
    out = tuple(dict.fromkeys(poolings))
    unknown = [p for p in out if p not in POOLINGS]
    if unknown or not out:
        raise ConfigError(f"unknown pooling {unknown or list(poolings)}; choose from {', '.join(POOLINGS)}")
    return out


def pooled_dim(embed_dim: int, pooling: str) -> int:
    """Width of a pooled vector: ``2 * embed_dim`` for ``cls+mean``, else ``embed_dim``."""
    check_poolings([pooling])
    return 2 * embed_dim if pooling == "cls+mean" else embed_dim


ArrayT = TypeVar("ArrayT", "np.ndarray", "torch.Tensor")


def pool(cls_token: ArrayT, patch_mean: ArrayT, pooling: str) -> ArrayT:
    """One pooling of normalised tokens.

    Args:
        cls_token: ``[B, D]`` final-LayerNorm class tokens (a torch tensor or a numpy array).
        patch_mean: ``[B, D]`` mean of the final-LayerNorm patch tokens (registers excluded).
        pooling: ``cls``, ``mean`` or ``cls+mean`` (concatenated in that order).

    Returns:
        ``[B, D]`` (``[B, 2D]`` for ``cls+mean``), in the inputs' dtype.

    Raises:
        ConfigError: an unknown pooling name.
    """
    if pooling == "cls":
        return cls_token
    if pooling == "mean":
        return patch_mean
    if pooling == "cls+mean":
        if isinstance(cls_token, np.ndarray):
            return np.concatenate([cls_token, patch_mean], axis=-1)  # [B, 2D]
        import torch  # a tensor was passed in, so torch is loaded already: this import costs nothing

        return torch.cat([cls_token, patch_mean], dim=-1)  # [B, 2D]
    raise ConfigError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
