"""A pretrained-CNN stem in front of the patch projection: a hybrid ViT (an option, off in every official model).

Dosovitskiy et al. (2021) already fed a ViT the feature map of a ResNet's first stages ("hybrid" models). Here
the stem is the first ``N`` blocks of torchvision's MobileNetV2 ``features``, so a student distilled from an
ImageNet MobileNetV2 can start from the teacher's own low-level filters (see ``students[].stem_from_teacher``
in the distillation recipes) and spend its training on what the transformer adds. The stem's stride (2 to 32,
the product of the blocks' strides) shrinks the image before the projection, whose kernel and stride become
``p / stride``: the token grid, position embedding and every caller see what the plain patch embedding gives
(``[B, H // p, W // p, D]``).

Batch norms are frozen (torchvision's ``FrozenBatchNorm2d``: statistics and affine as buffers) rather than
trained: the EMA teacher copies parameters, not running statistics, and a frozen norm behaves identically in
training and evaluation, on any batch size and any number of ranks. The convolutions stay trainable.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn

from dinoforge.core.backbone.config import MOBILENET_V2_CHANNELS, MOBILENET_V2_STRIDES
from dinoforge.core.errors import CheckpointError


def mobilenet_v2_stem(blocks: int) -> nn.Sequential:
    """The first ``blocks`` blocks of torchvision's MobileNetV2 ``features``, batch norms frozen.

    Parameter names are torchvision's with the ``features.`` prefix dropped (``0.0.weight``, ``1.conv.0.0.weight``
    ...), so a torchvision state dict loads by stripping that prefix.
    """
    if not 1 <= blocks <= len(MOBILENET_V2_STRIDES):
        raise ValueError(f"a MobileNetV2 stem has 1 to {len(MOBILENET_V2_STRIDES)} blocks, got {blocks}")
    from torchvision.models import mobilenet_v2  # the training install's; imported only for hybrid models
    from torchvision.ops.misc import FrozenBatchNorm2d

    features = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features
    return nn.Sequential(*list(features.children())[:blocks])


class CnnStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` preceded by the first ``blocks`` blocks of MobileNetV2.

    Parameter names: ``stem.<torchvision name without 'features.'>``, then timm's ``proj.weight/bias``. It
    accepts the keyword arguments timm's ``VisionTransformer`` passes to ``embed_layer``.

    Args:
        blocks: how many MobileNetV2 blocks; their stride must divide the patch size and the image size.
        in_chans: image channels (3: the stem is an RGB network).
        **kwargs: the rest of timm's ``PatchEmbed`` arguments (``img_size``, ``patch_size``, ``embed_dim``, ...).
    """

    def __init__(self, *, blocks: int, in_chans: int = 3, **kwargs: Any) -> None:
        if in_chans != 3:
            raise ValueError(f"a MobileNetV2 stem reads RGB images (in_chans 3), got in_chans {in_chans}")
        stem = mobilenet_v2_stem(blocks)
        stride = MOBILENET_V2_STRIDES[blocks - 1]
        patch, img = kwargs.pop("patch_size"), kwargs.pop("img_size")
        if patch % stride or img % stride:
            raise ValueError(f"a {blocks}-block MobileNetV2 stem has stride {stride}, which must divide the patch "
                             f"size {patch} and image size {img}")
        super().__init__(in_chans=MOBILENET_V2_CHANNELS[blocks - 1], patch_size=patch // stride,
                         img_size=img // stride, **kwargs)
        self.stem = stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, 3, H, W]``. Returns ``[B, H // p, W // p, D]`` (NHWC, as configured by timm)."""
        return super().forward(self.stem(x))


def load_mobilenet_stem(stem: nn.Module, state: dict[str, torch.Tensor], *, trainable: bool = False,
                        what: str = "the weights") -> None:
    """Copy a torchvision MobileNetV2 state dict's first blocks into ``stem`` (``features.i.*`` -> ``i.*``).

    Frozen by default: the stem is then a fixed ImageNet tokenizer and training spends its steps on the
    transformer (and skips the stem's backward pass).

    Raises:
        CheckpointError: ``state`` lacks a tensor of the stem or has it in another shape.
    """
    wanted = stem.state_dict()
    taken = {name: state.get(f"features.{name}") for name in wanted}
    missing = sorted(name for name, value in taken.items()
                     if value is None or tuple(value.shape) != tuple(wanted[name].shape))
    if missing:
        raise CheckpointError(f"{what} lack or reshape {len(missing)} MobileNetV2 stem tensors "
                              f"(first: features.{missing[0]})")
    stem.load_state_dict(taken)
    stem.requires_grad_(trainable)


@torch.no_grad()
def fold_frozen_batch_norms(module: nn.Module) -> int:
    """Fold every ``FrozenBatchNorm2d`` that directly follows a ``Conv2d`` in a ``Sequential`` into that
    convolution (weight scaled per output channel, bias shifted) and replace it by ``Identity``, in place.

    For inference graphs (ONNX export): a convolution then chains straight into its activation and the next
    convolution, which is the pattern int8 quantizers turn into one quantized convolution each; an unfolded
    norm leaves a float Mul/Add between them that forces a dequantize and a requantize.

    Returns:
        How many norms were folded.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = seq._modules[first], seq._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d)):
                continue
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.bias)
            conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)
            seq._modules[second] = nn.Identity()
            folded += 1
    return folded
