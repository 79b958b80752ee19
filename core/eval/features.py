"""Frozen-feature extraction: backbone poolings and the raw-pixel baseline, batched, on any device."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.data import DataSource, ImageBatch, SkipStats, image_batches
from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.pooling import check_poolings, pool
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.core.runtime import resolve_device

Autocast = Literal["bf16", "fp16"] | None
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureExtractor(Protocol):
    """Maps preprocessed pixels ``[B, 3, H, W]`` to named float32 features ``{name: [B, F]}`` on CPU."""

    names: tuple[str, ...]

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]: ...


def autocast_context(device: torch.device, autocast: Autocast) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``fp16``, or a no-op."""
    if autocast is None:
        return contextlib.nullcontext()
    if autocast not in _AUTOCAST_DTYPES:
        raise ConfigError(f"autocast must be one of {sorted(_AUTOCAST_DTYPES)} or None, got {autocast!r}")
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[autocast])


class BackboneExtractor:
    """Frozen backbone features under ``torch.inference_mode`` (several poolings from one forward pass).

    Args:
        backbone: a :class:`DinoVisionTransformer` (put in eval mode and moved to ``device``).
        poolings: names from :data:`~dinoforge.core.pooling.POOLINGS`.
        device: where the forward pass runs.
        autocast: ``bf16``/``fp16`` mixed precision, or ``None`` for full precision.
    """

    def __init__(self, backbone: DinoVisionTransformer, poolings: Sequence[str] = ("cls",), *,
                 device: str | torch.device = "cpu", autocast: Autocast = None) -> None:
        self.names = check_poolings(poolings)
        self.device = resolve_device(device)
        autocast_context(self.device, autocast)  # validate now, not at the first batch
        self.autocast = autocast
        self.backbone = backbone.eval().to(self.device)

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), autocast_context(self.device, self.autocast):
            out = self.backbone.forward_dino(pixels.to(self.device, non_blocking=True))
        cls_token = out["x_norm_clstoken"].float()  # [B, D]
        patch_mean = out["x_norm_patchtokens"].float().mean(dim=1)  # [B, N, D] -> [B, D]
        return {name: pool(cls_token, patch_mean, name).cpu() for name in self.names}


class PixelExtractor:
    """Raw-pixel baseline: the preprocessed image flattened to ``[B, 3*H*W]``."""

    names = ("pixels",)

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": pixels.detach().float().flatten(1).cpu()}


@dataclass
class FeatureSet:
    """Features of a source, in its order with bad samples left out.

    Attributes:
        features: ``{name: float32 [N, F]}`` on CPU.
        labels: ``int64 [N]`` (-1 = unlabelled).
        ids: sample ids.
        stats: what was skipped.
        seconds: wall time of the extraction.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: list[str]
    stats: SkipStats = field(default_factory=SkipStats)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise KeyError(f"no {name!r} features; have {list(self.features)}")
        return self.features[name]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> list[str]:
        """Feature names (poolings) held."""
        return list(self.features)


def extract_features(extractor: FeatureExtractor, data: DataSource | Iterable[ImageBatch], *,
                     preprocess: PreprocessConfig | None = None, batch_size: int = 256, num_workers: int = 0,
                     progress: bool = True, desc: str | None = None) -> FeatureSet:
    """Run ``extractor`` over a source (preprocessed with ``preprocess``) or over an existing loader.

    Raises:
        DataError: no readable sample at all.
    """
    if isinstance(data, DataSource):
        if preprocess is None:
            raise ConfigError("extract_features needs a preprocess contract to read a DataSource")
        desc = desc or data.spec
        data = image_batches(data, preprocess, batch_size=batch_size, num_workers=num_workers)
    stats: SkipStats = getattr(data, "stats", None) or SkipStats()
    chunks: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    ids: list[str] = []
    start = time.perf_counter()
    with tqdm(total=getattr(data, "num_samples", None), unit="img", desc=desc or "features",
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in data:
            for name, feats in extractor(batch.pixels).items():
                chunks.setdefault(name, []).append(feats)
            labels.append(batch.labels.to(torch.int64).cpu())
            ids.extend(batch.ids)
            bar.update(len(batch.ids))
    if not ids:
        raise DataError(f"no readable samples in {desc or 'the data'}: {stats.summary()}")
    return FeatureSet({n: torch.cat(c) for n, c in chunks.items()}, torch.cat(labels), ids, stats,
                      time.perf_counter() - start)


def image_to_features(extractor: FeatureExtractor, image: Image.Image,
                      preprocess: PreprocessConfig) -> dict[str, torch.Tensor]:
    """Features ``{name: [F]}`` of one PIL image (convenience for scripts and tests)."""
    from dinoforge.core.preprocess import preprocess_image

    return {k: v[0] for k, v in extractor(preprocess_image(image, preprocess).unsqueeze(0)).items()}
