"""The DINO projection head (also used as the iBOT patch head), with the official parameter names.

``mlp.0`` in->hidden, GELU, ``mlp.2`` hidden->hidden, GELU, ``mlp.4`` hidden->bottleneck, L2 normalisation,
then a weight-normalised, bias-free ``last_layer`` (``weight_g [K, 1]``, ``weight_v [K, bottleneck]``).

Initialisation is in place only (``empty`` + fills and draws), so a meta-device build can record and replay it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.core.backbone.config import HeadConfig  # defined beside BackboneConfig: torch-free


_BOUND = 2.0  # nn.init.trunc_normal_'s default truncation [-2, 2]


def trunc_normal_std_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """``nn.init.trunc_normal_(tensor, std=std)`` with its default bounds, drawn as the one ``normal_`` it is.

    torch's truncated normal draws ``normal_(0, std)`` and redraws the values outside ``[-2, 2]``; at
    ``std <= 0.2`` the bounds lie >= 10 standard deviations out, beyond any float32 normal draw, so no value is
    ever redrawn and the result is exactly this ``normal_``, bit for bit and with the same generator use. Unlike
    torch's (which returns early on meta tensors), this draw is recorded by a meta-device build.
    """
    if _BOUND / std < 10:
        raise ValueError(f"trunc_normal_std_ is exact only for std <= {_BOUND / 10}, got {std}")
    with torch.no_grad():
        return tensor.normal_(0.0, std)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``W[k] = g[k] * v[k] / ||v[k]||`` (legacy ``weight_norm`` over dim 0)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.ones_(self.weight_g)
        trunc_normal_std_(self.weight_v, 0.02)

    @property
    def weight(self) -> torch.Tensor:
        """Effective ``[K, in_dim]`` weight."""
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[..., in_dim]``. Returns ``[..., K]``."""
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    Args:
        config: head shape.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.in_dim] + [config.hidden_dim] * (config.nlayers - 1) + [config.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(config.bottleneck_dim, config.out_dim)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_std_(module.weight, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[N, in_dim]`` (CLS or patch tokens). Returns logits ``[N, K]``."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)  # [N, bottleneck]
        return self.last_layer(x)
