"""Teacher normalisation by Sinkhorn-Knopp (SwAV-style equipartition), as in the official DINOv2 code.

``Q = exp(logits / temp)`` is scaled to total mass 1, then three times each prototype row is normalised to
mass 1/K and each sample column to mass 1/n; finally columns are rescaled to sum to 1. Sums over samples are
all-reduced, so the partition is over the global batch; ``n`` is the *global* sample count.

No max-subtraction or log-domain trick is used: like the official code, ``exp`` overflows to ``inf`` once a
logit / temperature ratio exceeds ~88 in float32. That is kept on purpose (parity); the probabilities are
then NaN, which the trainer's loss-spike / NaN detection reports.
"""

from __future__ import annotations

import torch

from dinoforge.pretrain.losses.reduce import all_reduce_sum_, world_size


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float, *, n_iterations: int = 3,
                   total_samples: int | None = None) -> torch.Tensor:
    """Balanced teacher assignment probabilities.

    Args:
        logits: raw teacher logits of this rank ``[n_local, K]`` (any float dtype; computed in float32).
        teacher_temp: teacher temperature.
        n_iterations: Sinkhorn iterations (official 3).
        total_samples: global sample count n. Default ``n_local * world_size`` (the DINO CLS case, every rank
            holding the same number of rows); the iBOT patch loss passes the all-reduced masked count.

    Returns:
        ``[n_local, K]`` float32; every row sums to 1 and each prototype receives ~n/K of the total mass.
    """
    q = torch.exp(logits.float() / teacher_temp).t()  # [K, n_local]
    n = q.shape[1] * world_size() if total_samples is None else total_samples
    k = q.shape[0]
    total_mass = all_reduce_sum_(torch.sum(q))
    q /= total_mass
    for _ in range(n_iterations):
        row_mass = all_reduce_sum_(torch.sum(q, dim=1, keepdim=True))  # [K, 1]
        q /= row_mass
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)  # [1, n_local]
        q /= n
    q *= n
    return q.t()
