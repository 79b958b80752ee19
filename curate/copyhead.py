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
4. calibration on held-out training photos and benchmark-style copies of them, through a simulated dedup
   (:mod:`~.copycalib`): the lowest threshold whose removals reach ``min_precision``; the record keeps the
   recall there and the whole curve.

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

from dinoforge.curate.copycalib import calibrate_dedup, copy_views
from dinoforge.curate.copynet import RawFeatures, embed_views, save_head
from dinoforge.curate.descriptor import info_nce, koleo
from dinoforge.curate.edits import training_view
from dinoforge.curate.linkage import Linkage
from dinoforge.curate.photopool import PoolImage, photo_pool, split_of

log = logging.getLogger("dinoforge.curate")


def view_features(images: list[PoolImage], raw: RawFeatures, views: int, seed: int) -> np.ndarray:
    """Raw features ``[N, views + 1, D_raw]``: each image as it is (view 0), then ``views`` augmentations."""
    return embed_views(images, raw, lambda im, rng: [training_view(im, rng) for _ in range(views)], seed)


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
    """Linear map ``[d, dim]`` trained with InfoNCE + KoLeo on whitened views ``x [N, V, d]``, the same bits on
    every run: it trains on one thread (how two threads split a reduction changes its last bit, and 1,500
    AdamW steps grow that into another head, up to 0.24 apart in a weight; one thread costs ~1.6x, seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, dim, steps, batch, temperature, koleo_weight, seed)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, dim: int, steps: int, batch: int, temperature: float, koleo_weight: float,
           seed: int) -> torch.Tensor:
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


def _cached_features(fit: list[PoolImage], calib: list[PoolImage], raw: RawFeatures, views: int, seed: int,
                     cache: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``(fit [N, V+1, D_raw] training views, calib [M, 1+F, D_raw] benchmark-style copies)``, read from
    ``cache`` when it holds the same images, else computed (and written there)."""
    ids = np.array([p.id for p in fit] + ["|"] + [p.id for p in calib])
    if cache and Path(cache).is_file():
        with np.load(cache) as data:
            if "ids" in data and np.array_equal(data["ids"], ids) and data["fit"].shape[1] == views + 1:
                return data["fit"], data["calib"]
        log.info("copy-head: %s holds other images or views; embedding again", cache)
    fit_x = view_features(fit, raw, views, seed)
    cal_x = copy_views(calib, raw, seed + 1)
    if cache:
        np.savez(cache, fit=fit_x, calib=cal_x, ids=ids)
    return fit_x, cal_x


def train_head(photos: str | Path, out: str | Path, *, views: int = 2, size: int = 224, whiten_dim: int = 512,
               dim: int = 256, shrink: float = 0.1, steps: int = 1500, batch: int = 256, temperature: float = 0.05,
               koleo_weight: float = 0.1, calibration_percent: int = 25, min_precision: float = 0.95,
               max_images: int | None = None, cache: str | Path | None = None, train_percent: int = 35,
               linkage: Linkage = "kept", seed: int = 0) -> dict[str, Any]:
    """Train, calibrate and save a head; returns its record (also stored in the file).

    ``train_percent``: the photo split (:func:`~.photopool.photo_pool`); keep the default so that the
    benchmark's originals stay unseen. ``cache``: an ``.npz`` of the raw view features, written on the first
    run and read on later ones with the same images (the embedding is the slow part; the head trains in
    seconds, so settings can be tried again cheaply). ``min_precision``: of the simulated dedup that sets the
    threshold (:func:`~.copycalib.calibrate_dedup`), grouped by ``linkage`` (:mod:`~.linkage`), the rule
    ``dinoforge dedup`` then uses with this head.
    """
    started = time.perf_counter()
    pool = [p for p in photo_pool(photos, train_percent=train_percent) if p.split in ("train", "small")]
    if max_images and len(pool) > max_images:  # evenly spaced, so every source keeps its share
        pool = [pool[i] for i in np.linspace(0, len(pool) - 1, max_images).round().astype(int)]
    calib = [p for p in pool if split_of("calibration/" + (p.group or p.id), calibration_percent) == "train"]
    held = {p.id for p in calib}
    fit = [p for p in pool if p.id not in held]
    raw = RawFeatures(size)
    fit_x, cal_x = _cached_features(fit, calib, raw, views, seed, cache)
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
        **calibrate_dedup(unit(cal_x[:, 0]), unit(cal_x[:, 1:]), unit(fit_x[:, 0]),
                          [p.group or p.id for p in calib], min_precision=min_precision, linkage=linkage)}
    record["seconds"] = round(time.perf_counter() - started, 1)
    save_head(out, mean, proj, record)
    return record


__all__ = ["train_head", "train_linear_head", "view_features", "whitening"]
