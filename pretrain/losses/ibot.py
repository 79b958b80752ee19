"""iBOT masked-patch loss as the official ``iBOTPatchLoss.forward_masked`` computes it.

``loss = sum_i w_i * H(p_i, s_i) / n_global_crops_total`` over the masked tokens i of all global crops, with
``w_i = 1 / (masked count of token i's crop)``. The division is by *all* 2B global crops, also the unmasked
ones, so the loss is the average over crops of each crop's mean token cross-entropy (0 for unmasked crops).
The official train step multiplies by ``loss_scales = 2`` and ``1 / n_global_crops = 1/2``, which cancel.
"""

from __future__ import annotations

import torch

from dinoforge.pretrain.losses.dino import cross_entropy_rows

#: Official factors of the iBOT term in the train step: ``loss_scales`` (2, "global crops processed together")
#: times ``ibot_loss_scale`` (1 / n_global_crops). They cancel; kept so the logged values match.
LOSS_SCALES = 2.0
IBOT_LOSS_SCALE = 0.5


def ibot_masked_loss(student_masked: torch.Tensor, teacher_probs: torch.Tensor, masks_weight: torch.Tensor, *,
                     n_global_crops_total: int, student_temp: float = 0.1) -> torch.Tensor:
    """Weighted masked-token cross-entropy.

    Args:
        student_masked: student patch logits at the masked tokens ``[M, K]`` (``mask_indices`` order).
        teacher_probs: normalised teacher patch probabilities ``[M, K]``.
        masks_weight: ``[M]``, 1 / masked count of each token's crop.
        n_global_crops_total: 2B, the number of global crops (rows of ``masks``).
        student_temp: student temperature.

    Returns:
        Scalar ``-sum_i w_i sum_k p_ik log_softmax(s_i / T)_k / 2B`` (0 when nothing is masked).
    """
    per_token = cross_entropy_rows(teacher_probs, student_masked, student_temp)  # [M]
    return -(per_token * masks_weight).sum() / n_global_crops_total
