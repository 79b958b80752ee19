"""A fast, deterministic stand-in backend for tests of the transport and the batching engine.

It is a test double for *speed*, not a mock: it really computes features from the pixels (a fixed random
linear map of per-patch mean colours, plus an optional sleep that simulates a slow model), so batching,
ordering and pooling mistakes still show up as wrong numbers. Every real backend is tested separately.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.serve.backends.base import Backend, Features, ModelInfo


class FakeBackend(Backend):
    """Per-patch mean colour -> fixed random projection.

    Args:
        embed_dim: feature width ``D``.
        preprocessing: contract (defaults to a 28 px resize with 7 px patches).
        delay_s: sleep per batch, to test queueing, overload and deadlines.
        seed: seed of the projection.
    """

    name = "fake"

    def __init__(self, *, embed_dim: int = 16, preprocessing: PreprocessConfig | None = None,
                 delay_s: float = 0.0, seed: int = 0) -> None:
        pre = preprocessing or PreprocessConfig(mode="resize", size=28, resize_size=None, patch_size=7)
        super().__init__(ModelInfo(name="fake", embed_dim=embed_dim, preprocessing=pre,
                                   weights_sha256=f"fake-{embed_dim}-{seed}", patch_size=pre.patch_size))
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3, embed_dim, generator=gen)  # [3, D]
        self.cls_proj = torch.randn(embed_dim, embed_dim, generator=gen) / embed_dim**0.5  # [D, D]
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []  # every batch size seen, for engine tests

    def core(self, pixels: torch.Tensor) -> Features:
        """``[B, 3, H, W]`` -> ``[B, D]`` and ``[B, N, D]``."""
        p = self.info.patch_size
        colours = F.avg_pool2d(pixels.float(), kernel_size=p)  # [B, 3, h, w]
        patch = torch.einsum("bchw,cd->bhwd", colours, self.proj).flatten(1, 2)  # [B, N, D]
        patch = torch.tanh(patch)
        cls = torch.tanh(patch.mean(dim=1) @ self.cls_proj)  # [B, D]
        self.batch_sizes.append(int(pixels.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        return Features.from_tokens(cls, patch)
