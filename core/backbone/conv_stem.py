"""A convolutional stem in front of the patch projection (an option, off in every official architecture).

Xiao et al., "Early convolutions help transformers see better" (NeurIPS 2021), replace the single stride-p
patch projection with a few small convolutions and report faster, more stable optimisation and better
accuracy at short schedules. Here the stem keeps the patch geometry unchanged: stride-1 3x3 convolutions at
full resolution, each followed by a channel LayerNorm and GELU, then the usual ``p x p`` stride-``p``
projection. The token grid, position embedding, iBOT masks and every caller therefore see exactly what the
plain patch embedding gives (``[B, H // p, W // p, D]``); only what a token can describe changes.

LayerNorm rather than the paper's BatchNorm: the EMA teacher copies parameters, not running statistics, and
a per-sample norm behaves identically in training and evaluation, on any batch size and any number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import LayerNorm2d, PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` preceded by stride-1 ``3x3 conv -> LayerNorm2d -> GELU`` layers.

    Parameter names: ``stem.{3i}.weight`` (conv, no bias), ``stem.{3i+1}.weight/bias`` (norm), then timm's
    ``proj.weight/bias``. It accepts the keyword arguments timm's ``VisionTransformer`` passes to
    ``embed_layer``.

    Args:
        channels: output channels of each stem convolution (at least one).
        in_chans: image channels.
        **kwargs: the rest of timm's ``PatchEmbed`` arguments (``img_size``, ``patch_size``, ``embed_dim``,
            ``output_fmt``, ``strict_img_size``, ...).
    """

    def __init__(self, *, channels: Sequence[int], in_chans: int = 3, **kwargs: Any) -> None:
        if not channels or min(channels) <= 0:
            raise ValueError(f"a convolutional stem needs one or more positive channel counts, got {channels}")
        super().__init__(in_chans=channels[-1], **kwargs)
        layers: list[nn.Module] = []
        for width_in, width_out in zip((in_chans, *channels[:-1]), channels, strict=True):
            layers += [nn.Conv2d(width_in, width_out, kernel_size=3, padding=1, bias=False),
                       LayerNorm2d(width_out), nn.GELU()]
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, C, H, W]``. Returns ``[B, H // p, W // p, D]`` (NHWC, as configured by timm)."""
        return super().forward(self.stem(x))
