"""An export-friendly view of a :class:`DinoVisionTransformer` for one fixed input resolution.

What differs from the training module, and why:

* the position embedding is resampled once, with the official code, for the declared resolution and stored
  as a constant — the register models' bicubic *antialiased* resize would otherwise appear as a ``Resize``
  node that the legacy exporter cannot write and TensorRT cannot build;
* attention is written out (``MatMul``/``Softmax``/``MatMul``) so precision can be chosen per op; in fp32 it
  takes the form ONNX Runtime's transformer optimizer fuses into one ``Attention`` node per block (see
  :func:`dinoforge.export.quantize.fuse_transformer`): separate q / k / v ``MatMul`` + ``Add`` (the fused qkv
  weight split in three), ``Reshape`` -> ``Transpose``, ``MatMul`` -> ``Div`` by sqrt(head dim) -> ``Softmax``
  -> ``MatMul`` -> ``Transpose`` -> ``Reshape`` -> projection, and LayerScale folded into the projection and
  the MLP's output layer (``gamma * (W x + b) = (gamma W) x + gamma b``) so the projection's ``Add`` feeds the
  residual ``Add`` directly, as the fusion's pattern requires;
* in fp16 every LayerNorm and Softmax runs in fp32 between explicit casts (fp16 LayerNorm statistics
  overflow on large activations), while weights, matmuls and the residual stream are fp16;
* inputs and outputs stay float32 (or uint8 pixels) for every precision, so the I/O contract never changes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.cnn_stem import fold_frozen_batch_norms
from dinoforge.core.preprocess import PreprocessConfig


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear as three Linears: the q / k / v ``MatMul`` + ``Add`` ONNX Runtime's fusion reads.

    Args:
        qkv: ``Linear(D, 3 * A)``, rows ordered q, k, v (timm / DINOv2 layout).
    """

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        dim, out = qkv.in_features, qkv.out_features // 3
        bias = qkv.bias is not None
        self.q, self.k, self.v = (nn.Linear(dim, out, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, linear in enumerate((self.q, self.k, self.v)):
                linear.weight.copy_(qkv.weight[i * out:(i + 1) * out])  # [A, D]
                if bias:
                    linear.bias.copy_(qkv.bias[i * out:(i + 1) * out])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: x ``[B, N, D]``. Returns q, k, v, each ``[B, N, A]``."""
        return self.q(x), self.k(x), self.v(x)


def fold_layerscale(scale: nn.Module, linear: nn.Module) -> nn.Module:
    """Fold a LayerScale into the Linear before it (in place); returns what replaces the LayerScale.

    ``gamma * (W x + b) = (gamma W) x + gamma b``. Only for fp32: DINOv2's ``gamma`` starts at 1e-5 and would
    push fp16 weights into subnormals. Anything else (no LayerScale, a last layer that is not a Linear) is kept.
    """
    gamma = getattr(scale, "gamma", None)
    if gamma is None or not isinstance(linear, nn.Linear):
        return scale
    with torch.no_grad():
        linear.weight.mul_(gamma[:, None])  # [D_out, D_in]: one scale per output channel
        if linear.bias is not None:
            linear.bias.mul_(gamma)
    return nn.Identity()


def make_fusable(blocks: nn.ModuleList) -> None:
    """Rewrite fp32 blocks (in place) into the graph form ONNX Runtime fuses (see the module docstring)."""
    for blk in blocks:
        attn = blk.attn
        if not math.isclose(attn.scale, attn.head_dim ** -0.5):
            continue  # the fused Attention op divides by sqrt(head dim): another scale keeps the plain form
        attn.qkv = SplitQKV(attn.qkv)
        blk.ls1 = fold_layerscale(blk.ls1, attn.proj)
        blk.ls2 = fold_layerscale(blk.ls2, getattr(blk.mlp, "fc2", None))


class ExportableViT(nn.Module):
    """Fixed-resolution, exporter-friendly forward of a DINOv2 backbone.

    Args:
        backbone: the trained backbone (not modified; a copy is kept).
        resolution: input ``(H, W)``; multiples of the patch size.
        dtype: compute dtype (``torch.float32`` or ``torch.float16``).
        preprocess: when given, the module takes uint8 ``[B, H, W, 3]`` pixels and normalises them with this
            contract (``core.preprocess.normalize``) instead of float ``[B, 3, H, W]``.
        patch_tokens: also return the normalised patch tokens.
    """

    def __init__(self, backbone: DinoVisionTransformer, resolution: tuple[int, int], *,
                 dtype: torch.dtype = torch.float32, preprocess: PreprocessConfig | None = None,
                 patch_tokens: bool = False) -> None:
        super().__init__()
        cfg = backbone.config
        h, w = resolution
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of the patch size {cfg.patch_size}")
        self.grid = (h // cfg.patch_size, w // cfg.patch_size)
        self.resolution = (h, w)
        self.compute_dtype = dtype
        self.num_prefix = backbone.num_prefix_tokens
        self.return_patches = patch_tokens
        model = copy.deepcopy(backbone).eval().float()
        with torch.no_grad():
            pos = model.interpolate_pos_encoding(self.grid).detach().clone()  # [1, 1 + h*w, D]
        self.register_buffer("pos_embed", pos.to(dtype), persistent=False)
        self.patch_proj = model.patch_embed.proj
        # A convolutional stem (BackboneConfig.stem_channels) runs before the projection, in fp32: its channel
        # LayerNorms would see fp16 statistics otherwise, and it is a small share of the compute.
        self.stem: nn.Module | None = getattr(model.patch_embed, "stem", None)
        self.cls_token = model.cls_token
        self.reg_token = model.reg_token
        self.blocks = model.blocks
        self.norm = model.norm
        self.to(dtype)
        for module in self.modules():  # LayerNorms stay fp32: their statistics overflow in fp16
            if isinstance(module, nn.LayerNorm):
                module.float()
        if self.stem is not None:
            self.stem.float()
            fold_frozen_batch_norms(self.stem)  # a MobileNetV2 stem's norms into its convs (see the function)
        if dtype == torch.float32:
            make_fusable(self.blocks)
        self.embed_preprocessing = preprocess is not None
        if preprocess is not None:
            self.register_buffer("pixel_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def _normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # Same operation order as core.preprocess.normalize: float, /255, -mean, /std.
        x = pixels.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        return (x / 255.0 - self.pixel_mean) / self.pixel_std

    def _layer_norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.float()).to(self.compute_dtype)

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, N, D]`` in compute dtype. Returns ``[B, N, D]``."""
        batch, tokens, _ = x.shape
        heads = attn.num_heads
        if isinstance(attn.qkv, SplitQKV):  # fp32: the form ONNX Runtime fuses into one Attention node
            q, k, v = attn.qkv(x)  # [B, N, A] each
            q = q.reshape(batch, tokens, heads, -1).transpose(1, 2)  # [B, heads, N, d]
            k = k.reshape(batch, tokens, heads, -1).permute(0, 2, 3, 1)  # [B, heads, d, N]
            v = v.reshape(batch, tokens, heads, -1).transpose(1, 2)  # [B, heads, N, d]
            probs = ((q @ k) / math.sqrt(attn.head_dim)).softmax(dim=-1)  # [B, heads, N, N]
        else:  # fp16: q is scaled before the product, so the scores cannot overflow before the division
            qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d]
            scores = (q * attn.scale) @ k.transpose(-2, -1)  # [B, heads, N, N]
            probs = scores.float().softmax(dim=-1).to(self.compute_dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, -1)  # [B, N, A]
        return attn.proj(out)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, 3, H, W]`` float32. Returns ``[B, 1 + R + h*w, D]`` in compute dtype."""
        if self.stem is not None:
            x = self.stem(x.float())  # [B, C, H / s, W / s]
        x = F.conv2d(x.to(self.compute_dtype), self.patch_proj.weight, self.patch_proj.bias,
                     stride=self.patch_proj.stride)  # [B, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        if self.reg_token is not None:
            regs = self.reg_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Args:
            x: float32 ``[B, 3, H, W]`` normalised pixels, or uint8 ``[B, H, W, 3]`` with embedded preprocessing.

        Returns:
            ``cls_embedding [B, D]``, ``mean_embedding [B, D]`` and, if requested, ``patch_tokens [B, h*w, D]``,
            all float32.
        """
        if self.embed_preprocessing:
            x = self._normalize_pixels(x)
        x = self._tokens(x)
        for blk in self.blocks:
            # branch first: ONNX Runtime's attention fusion takes the first Add feeding the residual as the
            # projection's bias, and block 0's stream is itself an Add (position embedding); a + b == b + a exactly
            x = blk.ls1(self._attention(blk.attn, self._layer_norm(blk.norm1, x))) + x
            x = x + blk.ls2(blk.mlp(self._layer_norm(blk.norm2, x)))
        x = self.norm(x.float())  # [B, 1 + R + h*w, D] fp32
        patches = x[:, self.num_prefix:]  # [B, h*w, D]
        outputs = (x[:, 0], patches.mean(dim=1))
        return outputs + (patches,) if self.return_patches else outputs
