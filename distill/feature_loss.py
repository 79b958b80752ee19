"""Head-free (feature) distillation: the adaptor and the token-matching loss.

The student's CLS and patch tokens (after its final LayerNorm) are mapped to the teacher's width by a small
adaptor and compared with the teacher's tokens of the *same* augmented view:

``loss = w_cc * (1 - cos)_cls + w_cl * SmoothL1_cls + w_pc * (1 - cos)_patch + w_pl * SmoothL1_patch``

Each term is a mean: cosine terms over tokens, smooth-L1 over tokens and channels. Patch terms average every
patch token of every crop (global and, when enabled, local), after the teacher's grid was brought onto the
student's (:mod:`.grid`). The adaptor is trained with the student and discarded at the end: the artifact is
the student backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.core.errors import ConfigError
from dinoforge.distill.config import FeatureModeConfig


class FeatureAdaptor(nn.Module):
    """Separate projections of CLS and patch tokens from the student width to the teacher width.

    Args:
        in_dim: student width D_s.
        out_dim: teacher width D_t.
        kind: ``linear`` (one ``Linear`` each) or ``mlp`` (``Linear -> GELU -> Linear`` each).
        hidden_dim: mlp width (default ``2 * out_dim``).
    """

    def __init__(self, in_dim: int, out_dim: int, *, kind: str = "linear", hidden_dim: int | None = None) -> None:
        super().__init__()
        self.cls = self._make(in_dim, out_dim, kind, hidden_dim)
        self.patch = self._make(in_dim, out_dim, kind, hidden_dim)

    @staticmethod
    def _make(in_dim: int, out_dim: int, kind: str, hidden_dim: int | None) -> nn.Module:
        if kind == "linear":
            return nn.Linear(in_dim, out_dim)
        hidden = hidden_dim or 2 * out_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: cls ``[n, D_s]``, patches ``[m, D_s]``. Returns ``[n, D_t]`` and ``[m, D_t]``."""
        return self.cls(cls), self.patch(patches)


def build_adaptor(cfg: FeatureModeConfig, student_dim: int, teacher_dim: int) -> FeatureAdaptor | None:
    """The adaptor a student needs (``None``: compare tokens directly).

    Raises:
        ConfigError: ``adaptor: none`` with different widths.
    """
    kind = cfg.adaptor
    if kind == "auto":
        kind = "linear" if student_dim != teacher_dim else "none"
    if kind == "none":
        if student_dim != teacher_dim:
            raise ConfigError(f"feature.adaptor=none but the student width {student_dim} differs from the "
                              f"teacher width {teacher_dim}; use adaptor: linear or mlp")
        return None
    return FeatureAdaptor(student_dim, teacher_dim, kind=kind, hidden_dim=cfg.adaptor_hidden_dim)


def token_terms(student: torch.Tensor, teacher: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine distance and mean smooth-L1 between matching rows (computed in float32).

    Args:
        student: ``[n, D]`` (after the adaptor).
        teacher: ``[n, D]``.
        beta: smooth-L1 threshold.

    Returns:
        ``mean_i (1 - cos(s_i, t_i))`` and ``mean_{i,d} SmoothL1(s_id - t_id)``.
    """
    s, t = student.float(), teacher.float()
    cosine = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return cosine, F.smooth_l1_loss(s, t, beta=beta)


def feature_losses(cfg: FeatureModeConfig, student_cls: torch.Tensor, teacher_cls: torch.Tensor,
                   student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four terms and their weighted ``total``.

    Args:
        student_cls, teacher_cls: ``[n_crops_total, D_t]``.
        student_patches, teacher_patches: ``[n_tokens_total, D_t]`` (teacher already on the student grid).
    """
    cls_cos, cls_l1 = token_terms(student_cls, teacher_cls, beta=cfg.smooth_l1_beta)
    patch_cos, patch_l1 = token_terms(student_patches, teacher_patches, beta=cfg.smooth_l1_beta)
    total = (cfg.cls_cosine_weight * cls_cos + cfg.cls_smooth_l1_weight * cls_l1
             + cfg.patch_cosine_weight * patch_cos + cfg.patch_smooth_l1_weight * patch_l1)
    return {"cls_cosine": cls_cos, "cls_smooth_l1": cls_l1, "patch_cosine": patch_cos,
            "patch_smooth_l1": patch_l1, "total": total}
