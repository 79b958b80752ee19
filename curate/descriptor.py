"""A copy-detection descriptor trained self-supervised, for the deduplication steps.

DINOv2 deduplicated LVD-142M with a dedicated copy-detection descriptor (SSCD, Pizzi et al. 2022), not with
the backbone being trained: semantic features put two different photos of similar objects close together,
which is exactly what deduplication must not merge. This module trains such a descriptor the SSCD way, at a
small scale: a dinoforge ViT learns, with an InfoNCE loss over a batch, to map two random copy-style
augmentations of the same image (crop with aspect change, flip, colour jitter, down/up-scaling, JPEG
re-encoding) close together and every other image of the batch away; a KoLeo term spreads the embeddings
so that genuinely different but similar images stay apart. No labels and no knowledge of which images are
copies are used. The result is an ordinary artifact (``dedup.model`` of a curation recipe).
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from dinoforge.core.artifact import Provenance, save_artifact
from dinoforge.core.backbone import build_backbone
from dinoforge.core.config import StrictModel
from dinoforge.core.data import FashionMNISTSource, IndexedSource, SubsetSource, iter_good, open_source
from dinoforge.core.preprocess import PreprocessConfig, normalize, pil_to_uint8, preprocess_tensor

log = logging.getLogger("dinoforge.curate")


class DescriptorConfig(StrictModel):
    """Training settings of the copy descriptor."""

    data: str = Field(..., description="training images (data source spec); keep it disjoint from test pools")
    out: str = Field(..., description="artifact directory to write")
    image_size: int = Field(28, ge=8)
    arch: dict[str, Any] = Field(default_factory=lambda: {"embed_dim": 128, "depth": 4, "num_heads": 4,
                                                          "patch_size": 4, "layerscale_init": 1.0})
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    temperature: float = Field(0.05, gt=0)
    koleo: float = Field(0.1, ge=0, description="weight of the KoLeo spreading term")
    proj_dim: int = Field(128, ge=8)
    min_side: float = Field(0.7, gt=0, le=1)
    jitter: float = Field(0.3, ge=0, lt=1)
    min_scale: float = Field(0.5, gt=0, le=1, description="smallest down-scaling before scaling back")
    min_quality: int = Field(30, ge=1, le=100)
    seed: int = 0
    max_steps: int | None = Field(None, ge=1, description="stop early (smoke tests)")


def load_pixels(spec: str, size: int) -> torch.Tensor:
    """All images of ``spec`` as uint8 ``[N, 3, size, size]`` (resized, aspect ignored)."""
    source = open_source(spec)
    base = source.parent if isinstance(source, SubsetSource) else source
    cfg = PreprocessConfig(mode="resize", size=size, resize_size=None, interpolation="bilinear",
                           mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255), patch_size=1)
    if isinstance(base, FashionMNISTSource):  # fast path: the raw array, no PIL round trip
        idx = source.indices if isinstance(source, SubsetSource) else np.arange(len(base))
        x = torch.from_numpy(base.images[np.asarray(idx)].copy())[:, None].expand(-1, 3, -1, -1).contiguous()
        return preprocess_tensor(x, cfg).round().clamp(0, 255).to(torch.uint8)
    assert isinstance(source, IndexedSource)
    return torch.stack([preprocess_tensor(pil_to_uint8(s.image), cfg).round().clamp(0, 255).to(torch.uint8)
                        for s in iter_good(source)])


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of one ``[S, S, 3]`` uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


class CopyAugment:
    """Batched copy-style augmentation of uint8 images (torch ops, one JPEG round trip per image)."""

    def __init__(self, cfg: DescriptorConfig, generator: torch.Generator) -> None:
        self.cfg, self.g = cfg, generator

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n).uniform_(lo, hi, generator=self.g)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> uint8 ``[B, 3, S, S]``."""
        b, size = x.shape[0], x.shape[-1]
        c = self.cfg
        sx, sy = self._uniform(b, c.min_side, 1.0), self._uniform(b, c.min_side, 1.0)
        flip = torch.where(torch.rand(b, generator=self.g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = sx * flip, sy
        theta[:, 0, 2], theta[:, 1, 2] = (1 - sx) * self._uniform(b, -1, 1), (1 - sy) * self._uniform(b, -1, 1)
        grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
        y = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gray = y.mean(dim=1, keepdim=True)
        sat, con, bri = (self._uniform(b, 1 - c.jitter, 1 + c.jitter).view(b, 1, 1, 1) for _ in range(3))
        y = gray + (y - gray) * sat
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * con + mean) * bri
        side = max(4, round(size * float(self._uniform(1, c.min_scale, 1.0))))
        y = F.interpolate(y.clamp(0, 1), size=(side, side), mode="bilinear", antialias=True)
        y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=side > size).clamp(0, 1)
        u8 = (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, S, S, 3]
        quality = torch.randint(c.min_quality, 96, (b,), generator=self.g).tolist()
        out = np.stack([_jpeg(img, q) for img, q in zip(u8, quality, strict=True)])  # [B, S, S, 3]
        return torch.from_numpy(out).permute(0, 3, 1, 2)


def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over ``z [2B, P]`` where rows ``i`` and ``i + B`` are two views of one image."""
    n = z.shape[0] // 2
    sim = z @ z.T / temperature  # [2B, 2B]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def koleo(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko spreading term: ``-mean log(distance to the nearest other row)`` of unit ``z``."""
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    return -torch.log(F.pairwise_distance(z, z[nearest]) + eps).mean()


def train_descriptor(cfg: DescriptorConfig) -> Path:
    """Train the descriptor and save it as an artifact; returns the artifact path."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pixels = load_pixels(cfg.data, cfg.image_size)  # [N, 3, S, S] uint8
    pre = PreprocessConfig(mode="resize", size=cfg.image_size, resize_size=None, interpolation="bilinear",
                           patch_size=int(cfg.arch.get("patch_size", 4)))
    backbone = build_backbone("test", **{**cfg.arch, "img_size": cfg.image_size})
    proj = torch.nn.Linear(backbone.config.embed_dim, cfg.proj_dim)
    params = [*backbone.parameters(), *proj.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, len(pixels) // cfg.batch_size)
    steps = min(steps, cfg.max_steps or steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    augment, started, step, loss = CopyAugment(cfg, gen), time.perf_counter(), 0, torch.zeros(())
    backbone.train()
    while step < steps:
        for batch in torch.randperm(len(pixels), generator=gen).split(cfg.batch_size):
            if len(batch) < cfg.batch_size or step >= steps:
                continue
            views = torch.cat([augment(pixels[batch]), augment(pixels[batch])])  # [2B, 3, S, S]
            z = F.normalize(proj(backbone.forward_dino(normalize(views.float(), pre))["x_norm_clstoken"]), dim=1)
            loss = info_nce(z, cfg.temperature) + cfg.koleo * koleo(z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                log.info("descriptor step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(),
                         time.perf_counter() - started)
    prov = Provenance(source="copy-descriptor", recipe=cfg.model_dump_json(),
                      metrics={"final_loss": float(loss.item()), "steps": float(step),
                               "train_seconds": time.perf_counter() - started},
                      details={"data": cfg.data, "images": len(pixels),
                               "method": "InfoNCE + KoLeo on copy augmentations"})
    return save_artifact(cfg.out, backbone.eval(), name=f"copy-descriptor-{Path(cfg.out).name}", provenance=prov,
                         preprocessing=pre, overwrite=True)


def expected_steps(cfg: DescriptorConfig, n_images: int) -> int:
    """Optimizer steps a run will take (for logs and tests)."""
    steps = cfg.epochs * max(1, n_images // cfg.batch_size)
    return min(steps, cfg.max_steps or steps) if steps else 0


__all__ = ["CopyAugment", "DescriptorConfig", "expected_steps", "info_nce", "koleo", "load_pixels",
           "train_descriptor"]
