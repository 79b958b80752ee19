"""The DINOv2 Vision Transformer as a timm ``VisionTransformer``.

It speaks timm's vocabulary (``forward_features``, ``forward_head``, ``forward_intermediates``) and keeps timm's
parameter names, plus what DINOv2 needs on top:

* the official position-embedding interpolation (see :mod:`.pos_embed`), with the class position stored in
  ``pos_embed`` and register tokens that receive **no** position embedding;
* a learned ``mask_token`` that replaces masked patch embeddings *before* the position embedding (iBOT);
* the official output view (:meth:`forward_dino`) and ``get_intermediate_layers``;
* a list forward (:meth:`forward_dino_list`) that pushes global and local crops through the blocks as
  separate groups, with the official efficient stochastic depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dinoforge.core.backbone.block import Block
from dinoforge.core.backbone.config import BackboneConfig
from dinoforge.core.backbone.cnn_stem import CnnStemPatchEmbed
from dinoforge.core.backbone.conv_stem import ConvStemPatchEmbed
from dinoforge.core.backbone.pos_embed import interpolate_pos_embed

DinoFeatures = dict[str, torch.Tensor]


def drop_path_rates(config: BackboneConfig) -> list[float]:
    """Per-block stochastic-depth rates: uniform, or linear from 0 to the rate (official rule).

    The float32 ``linspace`` of the official code, always computed on the CPU: a model built under
    ``torch.device("meta")`` (sharded initialisation) reads the same plain floats.
    """
    if config.drop_path_uniform:
        return [config.drop_path_rate] * config.depth
    return torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()


class _BlockFactory:
    """Adapts timm's ``block_fn(**kwargs)`` call to our :class:`Block` and the official drop-path rule."""

    def __init__(self, config: BackboneConfig) -> None:
        self.config = config
        self.rates = drop_path_rates(config)

    def __call__(self, *, depth: int, **_timm_kwargs: Any) -> Block:
        c = self.config
        return Block(dim=c.embed_dim, num_heads=c.num_heads, hidden_dim=c.hidden_dim, ffn=c.ffn,
                     qkv_bias=c.qkv_bias, proj_bias=c.proj_bias, ffn_bias=c.ffn_bias,
                     layerscale_init=c.layerscale_init, drop_path=self.rates[depth], norm_eps=c.layernorm_eps)


class DinoVisionTransformer(VisionTransformer):
    """DINOv2-style ViT backbone (no classifier head; ``num_classes=0``).

    Token order everywhere is ``[cls, registers, patches]``.

    Args:
        config: architecture; see :class:`BackboneConfig`.
    """

    def __init__(self, config: BackboneConfig) -> None:
        embed_layer: Callable[..., nn.Module] = PatchEmbed
        if config.stem_channels:
            embed_layer = functools.partial(ConvStemPatchEmbed, channels=config.stem_channels,
                                            strides=config.stem_strides)
        elif config.mobilenet_stem_blocks:
            embed_layer = functools.partial(CnnStemPatchEmbed, blocks=config.mobilenet_stem_blocks)
        super().__init__(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
            global_pool="token", embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, init_values=config.layerscale_init,
            class_token=True, no_embed_class=False, reg_tokens=0, dynamic_img_size=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=config.layernorm_eps), block_fn=_BlockFactory(config),
            embed_layer=embed_layer,
        )
        self.config = config
        self.patch_size = config.patch_size
        # Registers are created here rather than by timm: timm would give them position-embedding rows.
        self.num_reg_tokens = config.num_register_tokens
        self.reg_token = nn.Parameter(torch.zeros(1, self.num_reg_tokens, config.embed_dim)) \
            if self.num_reg_tokens else None
        self.num_prefix_tokens = 1 + self.num_reg_tokens
        # empty + zeros_ (not torch.zeros): an in-place init is what a meta-device build records and replays
        self.mask_token = nn.Parameter(torch.empty(1, config.embed_dim))
        nn.init.zeros_(self.mask_token)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if config.frozen_patch_embed:
            self.patch_embed.requires_grad_(False)

    # ------------------------------------------------------------------ embeddings
    def interpolate_pos_encoding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``[1, 1 + h*w, D]`` position embedding for a patch grid, official interpolation mode."""
        return interpolate_pos_embed(self.pos_embed, grid_hw, offset=self.config.interpolate_offset,
                                     antialias=self.config.interpolate_antialias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, h, w, D]`` patch embeddings. Returns ``[B, 1 + R + h*w, D]`` tokens."""
        batch, h, w, dim = x.shape
        pos = self.interpolate_pos_encoding((h, w))  # [1, 1 + h*w, D]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, h * w, dim)], dim=1) + pos
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(batch, -1, -1), x[:, 1:]], dim=1)
        return self.pos_drop(x)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, substitute masked patches, add position embedding, insert registers.

        Args:
            x: images ``[B, C, H, W]``; H and W are floored to multiples of the patch size by the conv.
            masks: optional bool ``[B, h*w]``; True patches are replaced by ``mask_token``.

        Returns:
            ``[B, 1 + R + h*w, D]``.
        """
        h_px, w_px = x.shape[-2] // self.patch_size * self.patch_size, x.shape[-1] // self.patch_size * self.patch_size
        if h_px == 0 or w_px == 0:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size}px patch")
        # Like a stride-p convolution, ignore the bottom/right remainder instead of asserting divisibility.
        x = self.patch_embed(x[..., :h_px, :w_px])  # [B, h, w, D]
        if masks is not None:
            batch, h, w, dim = x.shape
            if masks.shape != (batch, h * w):
                raise ValueError(f"masks must be [B, h*w] = {[batch, h * w]}, got {list(masks.shape)}")
            mask_token = self.mask_token.to(x.dtype).view(1, 1, 1, dim)
            x = torch.where(masks.view(batch, h, w, 1), mask_token, x)
        return self.norm_pre(self._pos_embed(x))

    # ------------------------------------------------------------------ timm vocabulary
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens ``[B, 1 + R + h*w, D]`` (timm semantics), optionally with iBOT masks."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = self._run_block(blk, x, attn_mask)
        return self.norm(x)

    def _run_block(self, blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and attn_mask is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x, attn_mask=attn_mask)

    # ------------------------------------------------------------------ DINOv2 vocabulary
    def _split(self, x_prenorm: torch.Tensor, masks: torch.Tensor | None) -> DinoFeatures:
        x_norm = self.norm(x_prenorm)
        r = self.num_reg_tokens
        out = {
            "x_norm_clstoken": x_norm[:, 0],  # [B, D]
            "x_norm_regtokens": x_norm[:, 1:r + 1],  # [B, R, D]
            "x_norm_patchtokens": x_norm[:, r + 1:],  # [B, h*w, D]
            "x_prenorm": x_prenorm,  # [B, 1 + R + h*w, D]
        }
        if masks is not None:
            out["masks"] = masks
        return out

    def forward_dino(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> DinoFeatures:
        """Official ``forward_features`` output dict.

        Returns:
            ``x_norm_clstoken [B, D]``, ``x_norm_regtokens [B, R, D]``, ``x_norm_patchtokens [B, h*w, D]``,
            ``x_prenorm [B, 1+R+h*w, D]`` and, when given, ``masks``.
        """
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = self._run_block(blk, x, None)
        return self._split(x, masks)

    def forward_dino_list(self, xs: Sequence[torch.Tensor],
                          masks_list: Sequence[torch.Tensor | None]) -> list[DinoFeatures]:
        """Forward several crop groups (e.g. ``[global, local]``) together, as the official list path does.

        Groups never attend to each other. In training, efficient stochastic depth draws rows per group in
        the official order (per block: attention draws for every group, then MLP draws).
        """
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks_list, strict=True)]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(blk.forward_list, tokens, use_reentrant=False)
            else:
                tokens = blk.forward_list(tokens)
        return [self._split(t, m) for t, m in zip(tokens, masks_list, strict=True)]

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, *, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple[Any, ...]:
        """Official ``get_intermediate_layers``: outputs of the last ``n`` blocks (or of the listed blocks).

        Registers are stripped. With ``norm`` (the official default) the final LayerNorm is applied.

        Returns:
            A tuple of patch tokens ``[B, h*w, D]`` (or ``[B, D, h, w]`` with ``reshape``), or of
            ``(patch_tokens, class_token [B, D])`` pairs with ``return_class_token``.
        """
        total = len(self.blocks)
        take = set(range(total - n, total)) if isinstance(n, int) else set(n)
        if not take or min(take) < 0 or max(take) >= total:
            raise ValueError(f"block indices {sorted(take)} out of range for depth {total}")
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, self.num_prefix_tokens:] for o in outputs]
        if reshape:
            patches = [p.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimiser factory should not decay (DINOv2 recipes use their own rule)."""
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}
