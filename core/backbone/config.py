"""Typed architecture description of a DINOv2-style ViT and the registry of named variants.

A :class:`BackboneConfig` is everything needed to rebuild a backbone from a state dict; it is stored verbatim
in every model card (``model.json``) so an artifact can be rebuilt without knowing how it was made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinoforge.core.errors import ConfigError

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 only
    from typing_extensions import Unpack


#: Output stride after each block of torchvision's MobileNetV2 ``features`` (index ``i``: after blocks ``0..i``).
MOBILENET_V2_STRIDES = (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
#: Output channels of each block of MobileNetV2 ``features`` (width multiplier 1.0).
MOBILENET_V2_CHANNELS = (32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320, 1280)


class BackboneConfig(BaseModel):
    """Hyper-parameters of a DINOv2-style Vision Transformer.

    Defaults follow the official hub models (ViT-S/14, pos-embed trained at 518 px, LayerScale 1e-5).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(384, gt=0)
    depth: int = Field(12, gt=0)
    num_heads: int = Field(6, gt=0)
    patch_size: int = Field(14, gt=0)
    img_size: int = Field(518, gt=0, description="Image size the position embedding grid was trained at.")
    in_chans: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    ffn: Literal["mlp", "swiglu"] = "mlp"
    mlp_hidden_dim: int | None = Field(None, description="Overrides the hidden width derived from mlp_ratio.")
    num_register_tokens: int = Field(0, ge=0)
    layerscale_init: float | None = 1e-5
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layernorm_eps: float = 1e-6
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_uniform: bool = False
    frozen_patch_embed: bool = Field(False, description="MoCo v3 trick: freeze a random patch projection.")
    stem_channels: tuple[int, ...] = Field((), description="3x3 conv stem widths before the patch "
                                           "projection (empty: the official linear patch embedding).")
    stem_strides: tuple[int, ...] = Field((), description="stride (1 or 2) of each stem conv; empty: all 1. "
                                          "The projection then covers patch_size / prod(strides) pixels.")
    mobilenet_stem_blocks: int = Field(0, ge=0, le=19, description="a hybrid ViT: the first N blocks of "
                                       "torchvision's MobileNetV2 features before the projection (0: none).")

    @model_validator(mode="after")
    def _check_heads(self) -> BackboneConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if any(c <= 0 for c in self.stem_channels):
            raise ValueError(f"stem_channels must be positive, got {list(self.stem_channels)}")
        if self.stem_strides and (len(self.stem_strides) != len(self.stem_channels)
                                  or any(s not in (1, 2) for s in self.stem_strides)
                                  or self.patch_size % math.prod(self.stem_strides)):
            raise ValueError(f"stem_strides {list(self.stem_strides)} must be 1 or 2, one per stem_channels "
                             f"entry {list(self.stem_channels)}, with a product dividing patch_size {self.patch_size}")
        if self.mobilenet_stem_blocks:
            stride = MOBILENET_V2_STRIDES[self.mobilenet_stem_blocks - 1]
            if self.stem_channels or self.patch_size % stride or self.in_chans != 3:
                raise ValueError(f"mobilenet_stem_blocks {self.mobilenet_stem_blocks} (stride {stride}) needs RGB "
                                 f"input, no stem_channels and a patch_size that it divides ({self.patch_size})")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        return self

    @property
    def grid_size(self) -> int:
        """Side of the square position-embedding grid (``img_size // patch_size``)."""
        return self.img_size // self.patch_size

    @property
    def hidden_dim(self) -> int:
        """Width of the FFN hidden layer (per branch for SwiGLU)."""
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            # Official SwiGLUFFNFused: 2/3 of the MLP width, rounded up to a multiple of 8.
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def num_prefix_tokens(self) -> int:
        """CLS token plus register tokens."""
        return 1 + self.num_register_tokens


class _Registers(TypedDict, total=False):
    """Register-token fields of a named variant (keyword arguments of :func:`_official`)."""

    num_register_tokens: int
    interpolate_offset: float
    interpolate_antialias: bool


def _official(embed_dim: int, depth: int, num_heads: int, patch: int = 14, *, ffn: Literal["mlp", "swiglu"] = "mlp",
              **registers: Unpack[_Registers]) -> BackboneConfig:
    return BackboneConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch,
                          img_size=37 * patch, ffn=ffn, **registers)


_REG: _Registers = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}

#: Named architectures. ``*14`` follow the official hub models; ``test*`` are tiny variants for CI.
ARCHITECTURES: dict[str, BackboneConfig] = {
    "vitti14": _official(192, 12, 3),
    "vits14": _official(384, 12, 6),
    "vitb14": _official(768, 12, 12),
    "vitl14": _official(1024, 24, 16),
    "vitg14": _official(1536, 40, 24, ffn="swiglu"),
    "vitti16": _official(192, 12, 3, patch=16),
    "vits16": _official(384, 12, 6, patch=16),
    "vitb16": _official(768, 12, 12, patch=16),
    "vitl16": _official(1024, 24, 16, patch=16),
    "vits14_reg4": _official(384, 12, 6, **_REG),
    "vitb14_reg4": _official(768, 12, 12, **_REG),
    "vitl14_reg4": _official(1024, 24, 16, **_REG),
    "vitg14_reg4": _official(1536, 40, 24, ffn="swiglu", **_REG),
    # Tiny registered models for tests and CPU recipes (width 64, depth 2).
    "test": BackboneConfig(embed_dim=64, depth=2, num_heads=2, patch_size=14, img_size=56, layerscale_init=1.0),
    "test_reg4": BackboneConfig(embed_dim=64, depth=2, num_heads=2, patch_size=14, img_size=56,
                                layerscale_init=1.0, **_REG),
    "test_p16": BackboneConfig(embed_dim=64, depth=2, num_heads=2, patch_size=16, img_size=64, layerscale_init=1.0),
}


def get_arch(name: str, **overrides: object) -> BackboneConfig:
    """Return the named architecture, optionally with fields replaced.

    Raises:
        ConfigError: unknown name or invalid override.
    """
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; known: {known}")
    base = ARCHITECTURES[name]
    if not overrides:
        return base
    try:
        return BackboneConfig(**{**base.model_dump(), **overrides})
    except ValueError as err:
        raise ConfigError(f"invalid override for architecture {name!r}: {err}") from err


class HeadConfig(BaseModel):
    """Shape of a DINO/iBOT head. Defaults are the official ones (K = 65536, 2048 hidden, 256 bottleneck)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(..., gt=0)
    out_dim: int = Field(65536, gt=0, description="Number of prototypes K.")
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    nlayers: int = Field(3, ge=1)
