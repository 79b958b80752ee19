"""Teacher normalisation by an EMA centre (DINO / iBOT "centering").

At step t the teacher probabilities are ``softmax((logits - c_t) / teacher_temp)`` and the centre then moves
to ``c_{t+1} = m * c_t + (1 - m) * mean_t`` where ``mean_t`` is this step's mean raw teacher logit. The
official code *defers* that update to the start of step t+1 (so the all-reduce can overlap the student
pass); the centre used at every step is the same either way. We apply it right after the softmax, so the
``center`` buffer always holds the centre the next step will use and a checkpoint needs nothing else.

Two multi-GPU statistics exist in the official code, both kept here:

* ``"pooled"`` (DINO CLS): the mean over every row of every rank, ``sum_ranks / (rows * world)``;
* ``"mean_of_rank_means"`` (iBOT patches): the unweighted average of per-rank means, whatever each rank's
  masked-token count is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.pretrain.losses.reduce import all_reduce_sum_, is_distributed, world_size

Reduction = Literal["pooled", "mean_of_rank_means"]


class Centering(nn.Module):
    """EMA centre of teacher logits, stored as a buffer (``center``) so checkpoints capture it.

    Args:
        num_prototypes: K.
        shape_prefix: leading singleton dims of the stored centre: ``(1,)`` gives ``[1, K]`` (official DINO),
            ``(1, 1)`` gives ``[1, 1, K]`` (official iBOT).
        momentum: centre momentum m (official 0.9).
        reduction: multi-rank statistic, see the module docstring.
    """

    def __init__(self, num_prototypes: int, *, shape_prefix: tuple[int, ...] = (1,), momentum: float = 0.9,
                 reduction: Reduction = "pooled") -> None:
        super().__init__()
        self.momentum = momentum
        self.reduction = reduction
        self.register_buffer("center", torch.zeros(*shape_prefix, num_prototypes))

    def softmax(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher probabilities.

        Args:
            logits: raw teacher logits ``[n, K]``.
            teacher_temp: teacher temperature.

        Returns:
            ``[n, K]`` float32 probabilities (rows sum to 1).
        """
        center = self.center.reshape(1, -1)  # [1, K]
        return F.softmax((logits.float() - center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, logits: Sequence[torch.Tensor]) -> None:
        """Move the centre towards this step's mean teacher logit.

        Args:
            logits: raw teacher logits ``[n_i, K]`` of every micro-batch of the step; the statistic is taken
                over all of them together (the effective batch).
        """
        rows = torch.cat([t.float() for t in logits])  # [n, K]
        if self.reduction == "pooled":
            batch_center = all_reduce_sum_(rows.sum(dim=0, keepdim=True))  # [1, K]
            batch_center = batch_center / (rows.shape[0] * world_size())
        else:
            batch_center = self._mean_of_rank_means(rows)
            if batch_center is None:
                return
        batch_center = batch_center.reshape(self.center.shape)
        # In place so the buffer object (registered with DDP/FSDP, referenced by checkpoints) stays the same.
        self.center.copy_(self.center * self.momentum + batch_center * (1 - self.momentum))

    def _mean_of_rank_means(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Unweighted mean over ranks of each rank's row mean ``[1, K]``; ranks without rows are left out.

        The official code would average a NaN (mean of zero rows) in that case and poison the centre for the
        rest of the run; with no rows anywhere the centre is left unchanged.
        """
        has_rows = rows.shape[0] > 0
        local = rows.mean(dim=0, keepdim=True) if has_rows else rows.new_zeros(1, rows.shape[1])  # [1, K]
        if not is_distributed():
            return local if has_rows else None
        packed = torch.cat([local, local.new_full((1, 1), float(has_rows))], dim=1)  # [1, K + 1]
        all_reduce_sum_(packed)
        n_ranks = packed[0, -1].item()
        return packed[:, :-1] / n_ranks if n_ranks > 0 else None
