"""Transformer block with timm parameter names and DINOv2's efficient stochastic depth.

The block keeps timm's layout (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) so timm and official
DINOv2 checkpoints load by name. Its extra is the *row-subset* stochastic depth of the official code: during
training a residual branch is evaluated only on ``max(int(b * (1 - rate)), 1)`` randomly chosen rows of a
batch and added back scaled by ``b / kept``, which saves compute instead of merely zeroing rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from timm.layers import Attention, DropPath, LayerScale, Mlp, SwiGLUPacked
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class RowSampler(Protocol):
    """Chooses which rows of a ``b``-row group keep a residual branch (efficient stochastic depth)."""

    def __call__(self, batch: int, keep: int, device: torch.device) -> torch.Tensor:
        """Return ``keep`` distinct int64 row indices in ``[0, batch)``."""
        ...


def randperm_sampler(batch: int, keep: int, device: torch.device) -> torch.Tensor:
    """The official sampler: the first ``keep`` entries of a random permutation."""
    return torch.randperm(batch, device=device)[:keep]


def sdpa_backend_for(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The attention-kernel context for a block input ``x`` (a no-op except for low precision on CPU).

    On CPU, PyTorch's fused flash-attention kernel is far slower in bfloat16/float16 than in float32, its
    backward above all (fwd+bwd of ``[64, 4, 17, 32]``: 9.2 ms in bf16 vs 1.1 ms in fp32, torch 2.14 on a
    2-core AVX-512/AMX Xeon), which made bf16 autocast training slower than fp32 there. The math kernel in
    bf16 runs the same call in 1.3 ms, so low-precision attention on CPU is routed to it; every other
    device and dtype keeps PyTorch's own choice. ``bench/bench_pretrain.py`` measures the effect.
    """
    if x.device.type != "cpu":
        return contextlib.nullcontext()
    low = x.dtype in _LOW_PRECISION or (torch.is_autocast_enabled("cpu")
                                        and torch.get_autocast_dtype("cpu") in _LOW_PRECISION)
    return sdpa_kernel(SDPBackend.MATH) if low else contextlib.nullcontext()


def kept_rows(batch: int, rate: float) -> int:
    """Rows kept by efficient stochastic depth (official rounding: Python float ``int``)."""
    return max(int(batch * (1 - rate)), 1)


class Block(nn.Module):
    """Pre-norm ViT block: ``x + ls1(attn(norm1 x))`` then ``x + ls2(mlp(norm2 x))``.

    Args:
        dim: token width D.
        num_heads: attention heads.
        hidden_dim: FFN hidden width (per branch for SwiGLU).
        ffn: ``"mlp"`` (GELU) or ``"swiglu"`` (packed ``fc1`` = official ``w12``).
        layerscale_init: LayerScale init value, ``None`` for no LayerScale.
        drop_path: stochastic-depth rate of this block.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, *, dim: int, num_heads: int, hidden_dim: int, ffn: str = "mlp", qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, layerscale_init: float | None = None,
                 drop_path: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1: nn.Module = LayerScale(dim, init_values=layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "swiglu":
            self.mlp: nn.Module = SwiGLUPacked(in_features=dim, hidden_features=2 * hidden_dim, bias=ffn_bias,
                                               act_layer=nn.SiLU)
        else:
            self.mlp = Mlp(in_features=dim, hidden_features=hidden_dim, bias=ffn_bias, act_layer=nn.GELU)
        self.ls2: nn.Module = LayerScale(dim, init_values=layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.row_sampler: RowSampler = randperm_sampler

    def _attn_branch(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        with sdpa_backend_for(x):
            return self.attn(self.norm1(x), attn_mask=attn_mask)

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Args: x ``[B, N, D]``. Returns ``[B, N, D]``."""
        if is_causal:
            raise ValueError("DINOv2 blocks are bidirectional; is_causal is not supported")
        if self.training and self.drop_path_rate > 0.1 and attn_mask is None:
            # Official single-tensor path: efficient stochastic depth only above a 0.1 rate.
            return self.forward_list([x])[0]
        x = x + self.drop_path1(self.ls1(self._attn_branch(x, attn_mask)))
        return x + self.drop_path2(self.ls2(self._mlp_branch(x)))

    def forward_list(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run several independent token groups (e.g. global and local crops) through the block.

        Attention never mixes groups (the official packed sequence uses a block-diagonal mask). In training
        with a drop rate, each group draws its own row subset: first every group's attention draw, then
        every group's MLP draw — the official draw order.

        Args:
            xs: groups ``[B_g, N_g, D]``.

        Returns:
            The updated groups, same shapes.
        """
        if not (self.training and self.drop_path_rate > 0):
            return [self.forward(x) for x in xs]
        xs = [self._drop_add(x, self._attn_branch, self.ls1) for x in xs]
        return [self._drop_add(x, self._mlp_branch, self.ls2) for x in xs]

    def _drop_add(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                  layerscale: nn.Module) -> torch.Tensor:
        batch = x.shape[0]
        rows = self.row_sampler(batch, kept_rows(batch, self.drop_path_rate), x.device)  # [kept]
        scale = batch / rows.numel()
        residual = layerscale(branch(x[rows]))  # [kept, N, D]
        return torch.index_add(x, 0, rows, residual.to(x.dtype), alpha=scale)
