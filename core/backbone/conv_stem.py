"""A convolutional stem in front of the patch projection (an option, off in every official architecture).

Xiao et al., "Early convolutions help transformers see better" (NeurIPS 2021), replace the single stride-p
patch projection with a few small convolutions and report faster, more stable optimisation and better
accuracy at short schedules. Each stem layer is a 3x3 convolution, a channel LayerNorm and a GELU; the
stem's strides (1 by default, at full resolution) shrink the map before the usual projection, whose kernel
and stride become ``p / prod(strides)``. A stride-2 stem is the paper's design and costs little: for a
112 px, patch-16 ViT-Ti, three stride-2 layers (32, 64, 128 channels) add ~25% to the forward pass where
one stride-1 layer of 24 channels more than doubles it. Either way the token grid, position embedding,
iBOT masks and every caller see exactly what the plain patch embedding gives (``[B, H // p, W // p, D]``);
only what a token can describe changes.

LayerNorm rather than the paper's BatchNorm: the EMA teacher copies parameters, not running statistics, and
a per-sample norm behaves identically in training and evaluation, on any batch size and any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import LayerNorm2d, PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` preceded by ``3x3 conv (stride 1 or 2) -> LayerNorm2d -> GELU`` layers.

    Parameter names: ``stem.{3i}.weight`` (conv, no bias), ``stem.{3i+1}.weight/bias`` (norm), then timm's
    ``proj.weight/bias``. It accepts the keyword arguments timm's ``VisionTransformer`` passes to
    ``embed_layer``.

    Args:
        channels: output channels of each stem convolution (at least one).
        strides: stride of each stem convolution (default all 1); their product divides the patch size.
        in_chans: image channels.
        **kwargs: the rest of timm's ``PatchEmbed`` arguments (``img_size``, ``patch_size``, ``embed_dim``,
            ``output_fmt``, ``strict_img_size``, ...).
    """

    def __init__(self, *, channels: Sequence[int], strides: Sequence[int] = (), in_chans: int = 3,
                 **kwargs: Any) -> None:
        if not channels or min(channels) <= 0:
            raise ValueError(f"a convolutional stem needs one or more positive channel counts, got {channels}")
        strides = tuple(strides) or (1,) * len(channels)
        reduction = math.prod(strides)
        patch, img = kwargs.pop("patch_size"), kwargs.pop("img_size")
        if len(strides) != len(channels) or patch % reduction or img % reduction:
            raise ValueError(f"stem strides {strides} must pair with channels {tuple(channels)} and divide the "
                             f"patch size {patch} and image size {img}")
        # The projection now covers p / reduction pixels of the stem's smaller map: same token grid.
        super().__init__(in_chans=channels[-1], patch_size=patch // reduction, img_size=img // reduction, **kwargs)
        layers: list[nn.Module] = []
        for width_in, width_out, stride in zip((in_chans, *channels[:-1]), channels, strides, strict=True):
            layers += [nn.Conv2d(width_in, width_out, kernel_size=3, stride=stride, padding=1, bias=False),
                       LayerNorm2d(width_out), nn.GELU()]
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, C, H, W]``. Returns ``[B, H // p, W // p, D]`` (NHWC, as configured by timm)."""
        return super().forward(self.stem(x))
