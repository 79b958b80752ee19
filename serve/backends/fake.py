"""A fast, deterministic stand-in backend for tests of the transport and the batching engine.

It is a test double for *speed*, not a mock: it really computes features from the pixels (a fixed random
linear map of per-patch mean colours, plus an optional sleep that simulates a slow model), so batching,
ordering and pooling mistakes still show up as wrong numbers. Every real backend is tested separately.
"""

from __future__ import annotations

import time

import numpy as np

from dinoforge.core.image_contract import PreprocessConfig
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
        gen = np.random.default_rng(seed)
        self.proj = gen.standard_normal((3, embed_dim), dtype=np.float32)  # [3, D]
        self.cls_proj = gen.standard_normal((embed_dim, embed_dim), dtype=np.float32) / np.float32(embed_dim**0.5)
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []  # every batch size seen, for engine tests

    def core(self, pixels: np.ndarray) -> Features:
        """``[B, 3, H, W]`` -> ``[B, D]`` and ``[B, N, D]``."""
        p = self.info.patch_size
        b, c, h, w = pixels.shape
        grid = pixels[:, :, : h // p * p, : w // p * p].astype(np.float32).reshape(b, c, h // p, p, w // p, p)
        colours = grid.mean(axis=(3, 5))  # [B, 3, h, w]: the mean colour of each patch
        patch = np.tanh(np.einsum("bchw,cd->bhwd", colours, self.proj).reshape(b, -1, self.proj.shape[1]))
        cls = np.tanh(patch.mean(axis=1) @ self.cls_proj)  # [B, D]
        self.batch_sizes.append(int(pixels.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        return Features.from_tokens(cls, patch)
