"""PyTorch backend: runs a dinoforge artifact's backbone directly (CPU or any torch device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.core.artifact import ModelCard, load_artifact
from dinoforge.core.preprocess import preprocess_image
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.errors import ConfigError
from dinoforge.serve.backends.base import Backend, Features, ModelInfo

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def info_from_card(card: ModelCard, name: str | None = None) -> ModelInfo:
    """The serving view of an artifact card."""
    return ModelInfo(name=name or card.name, embed_dim=card.embed_dim, preprocessing=card.preprocessing,
                     default_pooling=card.default_pooling, weights_sha256=card.weights_sha256,
                     patch_size=card.architecture.patch_size)


class TorchBackend(Backend):
    """Eager PyTorch inference of a :class:`DinoVisionTransformer`.

    Args:
        backbone: the model (moved to ``device``, eval mode).
        info: model facts.
        device: torch device string; GPU is a choice, never assumed.
        dtype: ``float32`` (default) or an autocast dtype for accelerators.
    """

    name = "torch"

    def __init__(self, backbone: DinoVisionTransformer, info: ModelInfo, *, device: str = "cpu",
                 dtype: str = "float32") -> None:
        super().__init__(info)
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise ConfigError(f"invalid device {device!r}: {err}") from err
        self.dtype = _DTYPES[dtype]
        self.model = backbone.eval().to(self.device)

    @classmethod
    def from_artifact(cls, path: str | Path, *, device: str = "cpu", name: str | None = None,
                      threads: int | None = None) -> TorchBackend:
        """Load an artifact directory (validated, hash checked); ``threads``: torch intra-op threads."""
        if threads:
            torch.set_num_threads(threads)
        art = load_artifact(path, load_heads=False)
        return cls(art.backbone, info_from_card(art.card, name), device=device)

    def pre(self, image: Image.Image) -> np.ndarray:
        """The torch preprocessing of evaluation (``core.preprocess``), bit for bit: float32 ``[3, H, W]``."""
        return preprocess_image(image, self.info.preprocessing).numpy()

    def core(self, pixels: np.ndarray) -> Features:
        """``[B, 3, H, W]`` -> CLS ``[B, D]``, mean ``[B, D]``, patch tokens ``[B, N, D]`` (float32 arrays)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device, non_blocking=True)
        autocast = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            out = self.model.forward_dino(x)
            cls, patch = out["x_norm_clstoken"].float(), out["x_norm_patchtokens"].float()
            mean = patch.mean(dim=1)  # in torch: the mean evaluation computes, not a numpy re-summation
        return Features(cls=cls.cpu().numpy(), mean=mean.cpu().numpy(), patch=patch.cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
