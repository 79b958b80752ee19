"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator), official variant.

Rows are L2-normalised, each row's nearest neighbour is the largest dot product (the diagonal excluded), and
``loss = -mean_i log(d_i + eps)`` with ``d_i = || x_i - x_nn(i) + eps ||_2``: the epsilon is added to the
*difference vector* (as ``torch.nn.functional.pairwise_distance`` does), so exact duplicates give
``d = sqrt(D) * eps`` rather than 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by dot product.

    Args:
        x: L2-normalised rows ``[B, D]``.

    Returns:
        ``[B]`` int64. With a single row, the row itself (its own dot product is replaced by -1).
    """
    dots = x @ x.t()  # [B, B]
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)  # exclude the diagonal
    return torch.max(dots, dim=1).indices


def koleo_loss(features: torch.Tensor, eps: float = 1e-8, *, return_index: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """KoLeo loss of one set of features (computed in float32, outside any autocast precision).

    Args:
        features: ``[B, D]`` (e.g. one global crop's pre-head student CLS tokens).
        eps: normalisation floor and distance epsilon (official 1e-8).
        return_index: also return the nearest-neighbour indices ``[B]``.

    Returns:
        Scalar loss, and the indices when ``return_index``.
    """
    x = F.normalize(features.float(), eps=eps, p=2, dim=-1)  # [B, D]
    index = nearest_neighbours(x)
    distances = F.pairwise_distance(x, x[index], p=2, eps=eps)  # [B]
    loss = -torch.log(distances + eps).mean()
    return (loss, index) if return_index else loss
