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
4. calibration, cross-fitted: the photos that qualify as originals (split ``train``, as the benchmark's
   originals do) fall into ``folds`` folds; each fold, with benchmark-style copies of its photos, goes
   through a simulated dedup (:mod:`~.copycalib`) against a head fitted on every other photo, and the
   removals of all folds are summed. The threshold is the lowest at which they reach ``min_precision``; the
   record keeps the recall there, each fold's size and threshold and the whole curve. The head is then
   fitted on every photo. A single held-out share of the originals chose 0.28-0.33 depending on its size
   (25-60 %); the sum of folds uses every original (docs/curation.md).

The head is the product of both linear maps (``proj = whiten @ head``), saved with :func:`~.copynet.save_head`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoforge.core.errors import ConfigError, DataError
from dinoforge.curate.copycalib import NEIGHBOURS, copy_views, pick_threshold, simulate_dedup
from dinoforge.curate.copynet import RawFeatures, embed_views, project, save_head
from dinoforge.curate.descriptor import info_nce, koleo
from dinoforge.curate.edits import training_view
from dinoforge.curate.linkage import Linkage
from dinoforge.curate.photopool import PoolImage, photo_pool

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


@dataclass(frozen=True)
class HeadSettings:
    """How one projection is fitted on raw view features (whitening, then the InfoNCE + KoLeo head)."""

    whiten_dim: int = 512
    dim: int = 256
    shrink: float = 0.1
    steps: int = 1500
    batch: int = 256
    temperature: float = 0.05
    koleo_weight: float = 0.1
    seed: int = 0

    def fit(self, views_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean [D_raw], proj [D_raw, dim])`` fitted on raw features ``[N, V+1, D_raw]``."""
        mean, whiten = whitening(views_x.reshape(-1, views_x.shape[-1]), self.whiten_dim, self.shrink)
        white = torch.from_numpy(((views_x - mean) @ whiten).astype(np.float32))  # [N, V+1, d]
        head = train_linear_head(white, min(self.dim, white.shape[-1]), self.steps, min(self.batch, len(views_x)),
                                 self.temperature, self.koleo_weight, self.seed).numpy()
        return mean, whiten @ head


def fold_of(item: PoolImage, folds: int) -> int:
    """The cross-fitting fold of a photo, from its split key: twins and both strips of a wallpaper share one,
    so no fold's head has trained on a twin or the other strip of a photo it calibrates on."""
    return int(hashlib.sha256(f"fold/{item.side or item.id}".encode()).hexdigest()[:8], 16) % folds


def cross_fit(pool: list[PoolImage], originals: np.ndarray, fit_x: np.ndarray, cal_x: np.ndarray,
              settings: HeadSettings, folds: int, linkage: Linkage,
              min_precision: float = 0.95) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Summed simulated-dedup counts (:func:`~.copycalib.simulate_dedup`) over ``folds`` folds of the
    originals: each fold's photos and their copies go through a dedup against a head fitted on every other
    photo, with those photos as the distractors. Returns ``(counts [T, 4], per fold: its photos and the
    threshold it alone would choose for ``min_precision``)``, the second to show how much one fold moves."""
    fold = np.array([fold_of(pool[i], folds) for i in originals])
    total: np.ndarray | None = None
    report: list[dict[str, Any]] = []
    for f in range(folds):
        held = originals[fold == f]
        if not held.size:
            report.append({"images": 0, "threshold": None})
            continue
        rest = np.setdiff1d(np.arange(len(pool)), held)
        mean, proj = settings.fit(fit_x[rest])
        cal = cal_x[fold == f]  # [m_f, 1+F, D_raw]
        counts = simulate_dedup(project(cal[:, 0], mean, proj), project(cal[:, 1:], mean, proj),
                                project(fit_x[rest, 0], mean, proj), [pool[i].group for i in held],
                                linkage=linkage)
        report.append({"images": int(held.size), "threshold": pick_threshold(counts, min_precision)["threshold"]})
        log.info("copy-head: fold %d/%d (%d photos): alone it would choose %.2f", f + 1, folds, held.size,
                 report[-1]["threshold"])
        if total is None:
            total = counts
        else:
            total[:, 1:] += counts[:, 1:]
    if total is None:
        raise DataError("the collection holds no photo that qualifies as an original: nothing to calibrate on")
    return total, report


def train_head(photos: str | Path, out: str | Path, *, views: int = 2, size: int = 224,
               settings: HeadSettings | None = None, folds: int = 4, min_precision: float = 0.95,
               max_images: int | None = None, cache: str | Path | None = None, train_percent: int = 35,
               linkage: Linkage = "kept") -> dict[str, Any]:
    """Train, calibrate and save a head; returns its record (also stored in the file).

    ``train_percent``: the photo split (:func:`~.photopool.photo_pool`); keep the default so that the
    benchmark's originals stay unseen. ``cache``: an ``.npz`` of the raw view features, written on the first
    run and read on later ones with the same images (the embedding is the slow part; a head trains in
    seconds, so settings can be tried again cheaply). The threshold is cross-fitted (:func:`cross_fit`):
    the lowest whose summed removals over the ``folds`` folds reach ``min_precision``, grouped by ``linkage``
    (:mod:`~.linkage`), the rule ``dinoforge dedup`` then uses with this head; the head itself is then
    fitted on every photo.
    """
    if folds < 2:
        raise ConfigError(f"folds must be at least 2 (each fold is calibrated on a head that never saw it), got {folds}")
    started = time.perf_counter()
    settings = settings or HeadSettings()
    pool = [p for p in photo_pool(photos, train_percent=train_percent) if p.split in ("train", "small")]
    if max_images and len(pool) > max_images:  # evenly spaced, so every source keeps its share
        pool = [pool[i] for i in np.linspace(0, len(pool) - 1, max_images).round().astype(int)]
    # calibration originals are photos that qualify as originals (split "train"), as the benchmark's do;
    # small photos (stamps, sprites) never are: they only train the projection and stand as distractors
    originals = np.array([i for i, p in enumerate(pool) if p.split == "train"], dtype=np.int64)
    if originals.size < folds:  # before the minutes of embedding
        raise DataError(f"{photos} holds {originals.size} photos that qualify as originals (shorter side >= 128 "
                        f"px, not flat), fewer than the {folds} calibration folds")
    raw = RawFeatures(size)
    fit_x, cal_x = _cached_features(pool, [pool[i] for i in originals], raw, views, settings.seed, cache)
    counts, fold_report = cross_fit(pool, originals, fit_x, cal_x, settings, folds, linkage, min_precision)
    mean, proj = settings.fit(fit_x)
    record: dict[str, Any] = {
        "size": size, "views": views, **{k: v for k, v in asdict(settings).items() if k != "koleo_weight"},
        "koleo": settings.koleo_weight, "whiten_dim": int(min(settings.whiten_dim, fit_x[..., 0].size - 1, fit_x.shape[-1])),
        "dim": int(proj.shape[1]), "train_images": len(pool), "photos": str(photos),
        "backbone": "MobileNetV2 (ImageNet, frozen)",
        "method": "multi-layer GeM -> shrunk PCA whitening -> InfoNCE + KoLeo linear head",
        **pick_threshold(counts, min_precision), "linkage": linkage, "k": NEIGHBOURS,
        "calibration": "cross-fitted simulated dedup", "folds": folds, "fold_calibrations": fold_report,
        "calibration_images": int(originals.size), "calibration_copies": int(originals.size * (cal_x.shape[1] - 1))}
    record["seconds"] = round(time.perf_counter() - started, 1)
    save_head(out, mean, proj, record)
    return record


__all__ = ["HeadSettings", "cross_fit", "fold_of", "train_head", "train_linear_head", "view_features",
           "whitening"]
