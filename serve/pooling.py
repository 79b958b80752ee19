"""Request-level embedding options on top of core pooling: truncation (OpenAI's ``dimensions``) and L2 norm.

The pooling itself is :func:`dinoforge.core.pooling.pool`, the one evaluation and the export parity check
use, so a served vector is the one the model card describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinoforge.core.pooling import Pooling
from dinoforge.core.pooling import pool as pool_tokens


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


def pool(cls: np.ndarray, mean: np.ndarray, options: PoolingOptions) -> np.ndarray:
    """Pool backbone outputs into embeddings, then truncate and normalise as the request asks.

    Args:
        cls: ``[B, D]`` final-LayerNorm class tokens.
        mean: ``[B, D]`` mean of the final-LayerNorm patch tokens.
        options: pooling, truncation and normalisation.

    Returns:
        float32 ``[B, D']`` with ``D' = dimensions or pooled_dim(D, pooling)``.
    """
    out = pool_tokens(cls, mean, options.pooling).astype(np.float32, copy=False)
    if options.dimensions is not None:
        out = out[:, : options.dimensions]
    if options.normalize:
        # torch.nn.functional.normalize's rule: divide by max(||x||, 1e-12)
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norm, np.float32(1e-12))
    return np.ascontiguousarray(out, dtype=np.float32)
