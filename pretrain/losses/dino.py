"""DINO CLS loss as the official ``SSLMetaArch.forward_backward`` composes it.

Every (student crop, teacher global crop) pair contributes one cross-entropy
``H(p, s) = -sum_k p_k log_softmax(s / student_temp)_k`` averaged over images, except same-view pairs:

* each local crop is paired with both teacher global crops;
* student global crop 0 is paired with teacher crop 1 and vice versa. The teacher rows arrive *swapped*
  (``[crop-1 rows; crop-0 rows]``), so row r of the student global logits meets row r of the teacher.

Both terms are divided by ``n_loss_terms = 2 + max(2 * n_local, 1)``; the global term carries an explicit
factor 2 (it is a mean over the 2B rows, i.e. the average of two pair terms). With no local crops the
normaliser is 3, not 2 (official quirk, kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

N_GLOBAL_CROPS = 2


def cross_entropy_rows(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``sum_k p_k * log_softmax(s / T)_k`` (note: *without* the minus sign, as the official helper).

    Args:
        teacher_probs: ``[..., K]``.
        student_logits: ``[..., K]``.
        student_temp: student temperature T.

    Returns:
        ``[...]``.
    """
    return torch.sum(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)


def n_loss_terms(n_local_crops: int) -> int:
    """Normaliser of both DINO terms: ``(n_global - 1) * n_global + max(n_local * n_global, 1)``."""
    return (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + max(n_local_crops * N_GLOBAL_CROPS, 1)


def dino_local_loss(student_local: torch.Tensor, teacher_probs: torch.Tensor, *, n_local_crops: int,
                    student_temp: float = 0.1) -> torch.Tensor:
    """Local-crop DINO term (normaliser included).

    Args:
        student_local: student CLS logits of the local crops ``[n_local * B, K]`` (row ``j * B + b``).
        teacher_probs: swapped teacher probabilities ``[2, B, K]``.
        n_local_crops: number of local crops per image (> 0).
        student_temp: student temperature.

    Returns:
        Scalar ``sum_j sum_c mean_b H(P_c[b], s_j[b]) / n_loss_terms``.
    """
    total = student_local.new_zeros(())
    for crop in student_local.chunk(n_local_crops):  # [B, K] each
        log_probs = F.log_softmax(crop / student_temp, dim=-1)
        for teacher in teacher_probs:  # [B, K]
            total = total - torch.sum(teacher * log_probs, dim=-1).mean()
    return total / n_loss_terms(n_local_crops)


def dino_global_loss(student_global: torch.Tensor, teacher_probs: torch.Tensor, *, n_local_crops: int,
                     student_temp: float = 0.1) -> torch.Tensor:
    """Global-crop DINO term (normaliser and the official factor 2 included).

    Args:
        student_global: student CLS logits of the (masked) global crops ``[2B, K]``, natural crop order.
        teacher_probs: swapped teacher probabilities ``[2, B, K]``.
        n_local_crops: number of local crops per image (only for the normaliser).
        student_temp: student temperature.

    Returns:
        Scalar ``2 * mean_r H(P[r], s[r]) / n_loss_terms``.
    """
    mean_ce = -cross_entropy_rows(teacher_probs.flatten(0, 1), student_global, student_temp).mean()
    return mean_ce * N_GLOBAL_CROPS / n_loss_terms(n_local_crops)


def swap_global_crops(rows: torch.Tensor) -> torch.Tensor:
    """Reorder ``[crop-0 rows; crop-1 rows]`` to ``[crop-1 rows; crop-0 rows]`` (an involution).

    Args:
        rows: ``[2B, ...]`` in natural crop order.

    Returns:
        ``[2B, ...]`` swapped.
    """
    first, second = rows.chunk(N_GLOBAL_CROPS)
    return torch.cat((second, first))
