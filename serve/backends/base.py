"""The backend interface: ``pre`` (image -> model input), ``core`` (batched inference), ``post`` (pooling).

Every backend exposes the same :class:`ModelInfo` (taken from the artifact card, the ONNX metadata or the
Triton repository) so the transport and the engine never know which runtime answers.

Pixels and features cross this interface as numpy arrays, so the serving stack runs without torch (the edge
runtime); the torch and TensorRT backends convert at their own boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinoforge.core.pooling import Pooling
from dinoforge.core import preprocess_np
from dinoforge.core.image_contract import PreprocessConfig, output_size
from dinoforge.serve.pooling import PoolingOptions, pool


@dataclass(frozen=True)
class ModelInfo:
    """What a server must know about the model, whatever runs it.

    Attributes:
        name: model name reported by the API.
        embed_dim: token width ``D``.
        preprocessing: the contract images are prepared with (same as evaluation and export).
        default_pooling: pooling used when a request names none.
        weights_sha256: identity of the weights (heads and indexes are bound to it).
        patch_size: backbone patch size.
    """

    name: str
    embed_dim: int
    preprocessing: PreprocessConfig
    default_pooling: Pooling = "cls"
    weights_sha256: str = ""
    patch_size: int = 14


@dataclass
class Features:
    """Backbone outputs of a batch.

    Attributes:
        cls: ``[B, D]`` final-LayerNorm class tokens.
        mean: ``[B, D]`` mean of the final-LayerNorm patch tokens (registers excluded).
        patch: ``[B, N, D]`` final-LayerNorm patch tokens, or ``None`` when the runtime does not return them
            (an ONNX graph exported without ``--patch-tokens``).
    """

    cls: np.ndarray
    mean: np.ndarray
    patch: np.ndarray | None = None

    @classmethod
    def from_tokens(cls, cls_token: np.ndarray, patch: np.ndarray) -> Features:
        """Build from CLS ``[B, D]`` and patch tokens ``[B, N, D]`` (float32)."""
        return cls(cls=cls_token, mean=patch.mean(axis=1, dtype=np.float32), patch=patch)

    def __len__(self) -> int:
        return int(self.cls.shape[0])

    def row(self, i: int) -> Features:
        """Features of image ``i`` as a batch of one."""
        patch = None if self.patch is None else self.patch[i : i + 1]
        return Features(cls=self.cls[i : i + 1], mean=self.mean[i : i + 1], patch=patch)

    @staticmethod
    def cat(rows: list[Features]) -> Features:
        """Concatenate batches (patch tokens kept only when every row has them with one shape)."""
        patches = [r.patch for r in rows if r.patch is not None]
        same = len(patches) == len(rows) and len({tuple(p.shape[1:]) for p in patches}) == 1
        return Features(cls=np.concatenate([r.cls for r in rows]), mean=np.concatenate([r.mean for r in rows]),
                        patch=np.concatenate(patches) if same else None)


class Backend(ABC):
    """A runtime that turns preprocessed pixel batches into backbone features."""

    #: registry name (``torch``, ``onnxruntime``, ``tensorrt``, ``triton``, ``fake``).
    name: str = "base"

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def pre(self, image: Image.Image) -> np.ndarray:
        """Decoded RGB image -> float32 ``[3, H, W]`` following the model's preprocessing contract (numpy)."""
        return preprocess_np.preprocess_image(image, self.info.preprocessing)

    @abstractmethod
    def core(self, pixels: np.ndarray) -> Features:
        """Run the backbone on ``[B, 3, H, W]`` preprocessed pixels (all images of one size)."""

    def post(self, features: Features, options: PoolingOptions) -> np.ndarray:
        """Pool features into ``[B, D']`` embeddings (see :func:`dinoforge.serve.pooling.pool`)."""
        return pool(features.cls, features.mean, options)

    @property
    def has_patch_tokens(self) -> bool:
        """Whether :meth:`core` returns patch tokens (``return_patch_tokens`` requests need them)."""
        return True

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the model once per batch size on blank images so the first request is not slow."""
        cfg = self.info.preprocessing
        h, w = output_size(cfg.size, cfg.size, cfg)
        for b in batch_sizes:
            self.core(np.zeros((b, 3, h, w), dtype=np.float32))

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing to release
        """Release runtime resources (sessions, connections)."""

    def describe(self) -> dict[str, object]:
        """Facts shown by ``/ready`` and logs."""
        return {"backend": self.name, "model": self.info.name, "embed_dim": self.info.embed_dim}
