"""Training and calibration of the copy descriptor's projection (``dinoforge copy-head``), SSCD-style.

The backbone stays frozen, so every image is embedded once per view and the projection trains on the cached
raw features in seconds:

1. views: each training image (the ``train`` and ``small`` photos of :func:`~.photopool.photo_pool`) as it
   is plus ``views`` strong random augmentations (:func:`~.edits.training_view`: crops down to 35 % area,
   one to three edits of the DISC21 list in random order), all through :class:`~.copynet.RawFeatures`;
2. PCA whitening of the raw vectors (shrunk: eigenvalues get ``+ shrink * mean eigenvalue`` so noisy
   low-variance directions are not blown up);
3. a linear head trained with InfoNCE (two random views of one image are positives, every other image of the
   batch a negative) plus a KoLeo term, the differential-entropy regulariser of SSCD, which spreads the
   descriptors so that similar-looking distinct photos keep a margin;
4. calibration on held-out training photos: the threshold is the lowest cosine similarity at which at most
   ``max_false_rate`` of the copies' most similar *other* image is above it; the record keeps the copy
   recall at that threshold.

The head is the product of both linear maps (``proj = whiten @ head``), saved with :func:`~.copynet.save_head`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoforge.curate.copynet import RawFeatures, save_head
from dinoforge.curate.descriptor import info_nce, koleo
from dinoforge.curate.edits import training_view
from dinoforge.curate.photopool import PoolImage, photo_pool, split_of

log = logging.getLogger("dinoforge.curate")


def view_features(images: list[PoolImage], raw: RawFeatures, views: int, seed: int) -> np.ndarray:
    """Raw features ``[N, views + 1, D_raw]``: each image as it is (view 0), then ``views`` augmentations."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(images), views + 1, raw.dim), np.float32)
    started = time.perf_counter()
    for i, item in enumerate(images):
        im = item.load()
        im.thumbnail((2 * raw.size, 2 * raw.size))  # edits on a 512 px photo cost more than the forward pass
        out[i] = raw([im, *(training_view(im, rng) for _ in range(views))])
        if (i + 1) % 50 == 0:
            log.info("copy-head: embedded %d/%d images x %d views (%.0f s)", i + 1, len(images), views + 1,
                     time.perf_counter() - started)
    return out


def whitening(x: np.ndarray, dim: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D_raw], W [D_raw, d])`` of shrunk PCA whitening of rows ``x [M, D_raw]``, ``d <= dim``."""
    mean = x.mean(axis=0)
    xc = x - mean
    values, vectors = np.linalg.eigh(xc.T @ xc / max(1, len(x) - 1))
    order = np.argsort(values)[::-1][:min(dim, len(x) - 1)]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    return mean, vectors / np.sqrt(values + shrink * values.mean())


def train_linear_head(x: torch.Tensor, dim: int, steps: int, batch: int, temperature: float,
                      koleo_weight: float, seed: int) -> torch.Tensor:
    """Linear map ``[d, dim]`` trained with InfoNCE + KoLeo on whitened views ``x [N, V, d]``."""
    gen = torch.Generator().manual_seed(seed)
    n, v, d = x.shape
    weight = torch.nn.Parameter(torch.eye(d, dim))  # start at the top principal directions
    opt = torch.optim.AdamW([weight], lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        rows = torch.randperm(n, generator=gen)[:batch]
        a = torch.randint(0, v, (rows.numel(),), generator=gen)
        b = (a + torch.randint(1, v, (rows.numel(),), generator=gen)) % v  # a different view of each image
        z = F.normalize(torch.cat([x[rows, a], x[rows, b]]) @ weight, dim=1)  # [2B, dim]
        loss = info_nce(z, temperature) + koleo_weight * koleo(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log.info("copy-head: step %d/%d loss %.4f", step + 1, steps, loss.item())
    return weight.detach()


def calibrate(clean: np.ndarray, copies: np.ndarray, max_false_rate: float,
              others: np.ndarray | None = None) -> dict[str, float]:
    """Threshold from unit descriptors of held-out images ``clean [m, D]`` and their copies ``[m, V, D]``.

    ``others [n, D]``: more distinct images the copies are compared with (the more images a copy meets, the
    higher its best impostor; a dedup pool is larger than the calibration set).
    """
    m, v, _ = copies.shape
    flat = copies.reshape(m * v, -1)
    sims = flat @ clean.T  # [m*V, m]
    own = np.repeat(np.arange(m), v)
    positive = sims[np.arange(m * v), own].copy()
    sims[np.arange(m * v), own] = -1.0
    impostor = sims.max(axis=1)  # the most similar other image of each copy
    if others is not None and len(others):
        impostor = np.maximum(impostor, (flat @ others.T).max(axis=1))
    threshold = float(np.quantile(impostor, 1.0 - max_false_rate))
    return {"threshold": threshold, "calibration_images": int(m), "calibration_copies": int(m * v),
            "copy_recall_at_threshold": float((positive >= threshold).mean()),
            "impostor_rate_at_threshold": float((impostor >= threshold).mean()),
            "positive_median": float(np.median(positive)), "impostor_median": float(np.median(impostor))}


def train_head(photos: str | Path, out: str | Path, *, views: int = 2, size: int = 160, whiten_dim: int = 512,
               dim: int = 256, shrink: float = 0.1, steps: int = 1500, batch: int = 256, temperature: float = 0.05,
               koleo_weight: float = 0.1, calibration_percent: int = 25, max_false_rate: float = 0.01,
               max_images: int | None = None, cache: str | Path | None = None, train_percent: int = 35,
               seed: int = 0) -> dict[str, Any]:
    """Train, calibrate and save a head; returns its record (also stored in the file).

    ``train_percent``: the photo split (:func:`~.photopool.photo_pool`); keep the default so that the
    benchmark's originals stay unseen. ``cache``: an ``.npz`` of the raw view features, written on the first run and read on later ones (the
    embedding is the slow part; the head trains in seconds, so settings can be tried again cheaply).
    """
    started = time.perf_counter()
    pool = [p for p in photo_pool(photos, train_percent=train_percent) if p.split != "bench"]
    if max_images and len(pool) > max_images:  # evenly spaced, so every source keeps its share
        pool = [pool[i] for i in np.linspace(0, len(pool) - 1, max_images).round().astype(int)]
    calib = [p for p in pool if split_of("calibration/" + p.id, calibration_percent) == "train"]
    held = {p.id for p in calib}
    fit = [p for p in pool if p.id not in held]
    raw = RawFeatures(size)
    if cache and Path(cache).is_file():
        with np.load(cache) as data:
            fit_x, cal_x = data["fit"], data["calib"]
    else:
        fit_x = view_features(fit, raw, views, seed)  # [N, V+1, D_raw]
        cal_x = view_features(calib, raw, views, seed + 1)
        if cache:
            np.savez(cache, fit=fit_x, calib=cal_x)
    mean, whiten = whitening(fit_x.reshape(-1, raw.dim), whiten_dim, shrink)
    white = torch.from_numpy(((fit_x - mean) @ whiten).astype(np.float32))  # [N, V+1, d]
    head = train_linear_head(white, min(dim, white.shape[-1]), steps, min(batch, len(fit)), temperature,
                             koleo_weight, seed).numpy()
    proj = whiten @ head  # [D_raw, dim]

    def unit(x: np.ndarray) -> np.ndarray:
        z = (x - mean) @ proj
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    record: dict[str, Any] = {
        "size": size, "views": views, "whiten_dim": int(whiten.shape[1]), "dim": int(proj.shape[1]),
        "shrink": shrink, "steps": steps, "temperature": temperature, "koleo": koleo_weight, "seed": seed,
        "train_images": len(fit), "photos": str(photos), "backbone": "MobileNetV2 (ImageNet, frozen)",
        "method": "multi-layer GeM -> shrunk PCA whitening -> InfoNCE + KoLeo linear head",
        **calibrate(unit(cal_x[:, 0]), unit(cal_x[:, 1:]), max_false_rate, others=unit(fit_x[:, 0]))}
    record["seconds"] = round(time.perf_counter() - started, 1)
    save_head(out, mean, proj, record)
    return record


__all__ = ["calibrate", "train_head", "train_linear_head", "view_features", "whitening"]
