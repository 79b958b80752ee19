"""Copy-detection evaluation of deduplication: inject transformed copies into a real pool and score the result.

``make_copy`` applies the copy transforms of the curation acceptance test — crop, flip, colour jitter
(brightness, contrast, saturation), resize and JPEG re-encoding — with strengths from :class:`CopyTransforms`.
``write_pool_with_copies`` materialises a pool folder (originals as PNG, copies as JPEG) and a ground-truth
table of injected groups; ``score_dedup`` compares a ``dedup/removed.parquet`` with it.

Scoring (every injected group = an original and its copies):

* recall: fraction of the copies that should go (``|group| - 1`` per group) that were removed;
* precision: of all removed images, the fraction that are such surplus group members (a removed image of
  a non-injected pool image, or a group that lost all of its members, counts against it);
* groups kept exactly once: fraction of groups with exactly one member left.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageOps
from pydantic import Field

from dinoforge.core.config import StrictModel
from dinoforge.core.data import IndexedSource, Sample
from dinoforge.core.errors import DataError
from dinoforge.core.fileio import atomic_open
from dinoforge.core.index.vectors import l2_normalize


class CopyTransforms(StrictModel):
    """Strength of the copy transforms (each copy gets all of them, with random parameters)."""

    min_side: float = Field(0.85, gt=0, le=1, description="crop keeps at least this fraction of each side")
    flip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    jitter: float = Field(0.2, ge=0, lt=1, description="brightness/contrast/saturation factor in 1 +- jitter")
    scale: tuple[float, float] = Field((0.75, 1.5), description="resize factor range of the cropped image")
    quality: tuple[int, int] = Field((50, 95), description="JPEG quality range")


def make_copy_jpeg(image: Image.Image, rng: np.random.Generator, t: CopyTransforms) -> bytes:
    """JPEG bytes of a transformed copy of ``image``: crop -> flip -> colour jitter -> resize -> JPEG."""
    image = image.convert("RGB")
    w, h = image.size
    cw, ch = max(1, round(w * rng.uniform(t.min_side, 1.0))), max(1, round(h * rng.uniform(t.min_side, 1.0)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < t.flip:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(1 - t.jitter, 1 + t.jitter))
    factor = rng.uniform(*t.scale)
    out = out.resize((max(8, round(cw * factor)), max(8, round(ch * factor))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=int(rng.integers(t.quality[0], t.quality[1] + 1)))
    return buffer.getvalue()


def make_copy(image: Image.Image, rng: np.random.Generator, t: CopyTransforms) -> Image.Image:
    """The decoded copy (RGB) of :func:`make_copy_jpeg`."""
    return Image.open(io.BytesIO(make_copy_jpeg(image, rng, t))).convert("RGB")


@dataclass
class InjectedPool:
    """A materialised pool: its folder and the ground truth of injected groups."""

    folder: Path
    groups: Path  # parquet: id, group (-1 for images without injected copies), role original|copy
    num_images: int
    num_groups: int


def _good(source: IndexedSource, index: int) -> Sample:
    sample = source[index]
    if not isinstance(sample, Sample):
        raise DataError(f"pool image {sample.id} is unreadable ({sample.reason}); pick another pool")
    return sample


def write_pool_with_copies(sources: list[IndexedSource], folder: Path, *, num_originals: int,
                           copies_per_original: int = 1, transforms: CopyTransforms | None = None,
                           seed: int = 0) -> InjectedPool:
    """Write every image of ``sources`` plus transformed copies of ``num_originals`` of them into ``folder``.

    Originals are drawn uniformly from all images. Files are named ``<source #>/<index>.png`` and
    ``copies/<source #>-<index>-<j>.jpg``.
    """
    transforms = transforms or CopyTransforms()
    rng = np.random.default_rng(seed)
    sizes = [len(s) for s in sources]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    if num_originals > total:
        raise DataError(f"cannot copy {num_originals} originals out of a pool of {total} images")
    chosen = set(rng.choice(total, size=num_originals, replace=False).tolist())
    ids, group_of, roles = [], [], []
    group = 0
    for s, source in enumerate(sources):
        (folder / f"{s}").mkdir(parents=True, exist_ok=True)
        for i in range(len(source)):
            image = _good(source, i).image
            image.save(folder / f"{s}" / f"{i:06d}.png")
            ids.append(f"{s}/{i:06d}.png")
            is_original = int(offsets[s]) + i in chosen
            group_of.append(group if is_original else -1)
            roles.append("original")
            if is_original:
                for j in range(copies_per_original):
                    name = f"copies/{s}-{i:06d}-{j}.jpg"
                    (folder / "copies").mkdir(exist_ok=True)
                    (folder / name).write_bytes(make_copy_jpeg(image, rng, transforms))
                    ids.append(name)
                    group_of.append(group)
                    roles.append("copy")
                group += 1
    truth = folder.parent / f"{folder.name}.groups.parquet"
    with atomic_open(truth) as handle:
        pq.write_table(pa.table({"id": ids, "group": group_of, "role": roles}), handle)
    return InjectedPool(folder, truth, len(ids), group)


def score_removals(removed_group: np.ndarray, sizes: np.ndarray) -> dict[str, Any]:
    """Precision / recall / groups kept exactly once of a deduplication.

    Args:
        removed_group: the injected group (``0..G-1``) of every removed image, ``-1`` for one in no group.
        sizes: ``[G]`` members of each injected group (an original and its copies).
    """
    removed_group = np.asarray(removed_group, dtype=np.int64)
    per_group = np.bincount(removed_group[removed_group >= 0], minlength=sizes.size)
    keep_one = np.maximum(sizes - 1, 0)
    surplus = int(np.minimum(per_group, keep_one).sum())
    over = int(np.maximum(per_group - keep_one, 0).sum())
    removed, should = int(removed_group.size), int(keep_one.sum())
    return {"removed": removed, "should_remove": should, "true_removals": surplus,
            "false_removals": int((removed_group < 0).sum()) + over, "recall": surplus / should if should else 1.0,
            "precision": surplus / removed if removed else 1.0, "groups": int(sizes.size),
            "groups_kept_once": float((per_group == keep_one).mean()) if sizes.size else 1.0,
            "kept_none": int((per_group == sizes).sum())}


def score_dedup(removed_ids: list[str], truth: Path) -> dict[str, Any]:
    """:func:`score_removals` of the removed ids against a ground-truth table (``id, group``; -1: no group)."""
    table = pq.read_table(truth).to_pandas()
    group = dict(zip(table["id"], table["group"], strict=True))
    removed = set(removed_ids)
    unknown = [r for r in removed if r not in group]
    if unknown:
        raise DataError(f"{len(unknown)} removed ids are not in the pool ground truth (first: {unknown[0]})")
    labels = sorted({int(g) for g in table["group"] if g >= 0})
    index = {g: i for i, g in enumerate(labels)}
    sizes = np.bincount([index[int(g)] for g in table["group"] if g >= 0], minlength=len(labels))
    return score_removals(np.array([index.get(int(group[r]), -1) for r in removed], np.int64), sizes)


def embed_images(model: str, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
    """CLS embeddings of PIL images with an artifact, preprocessed exactly as the extraction engine does."""
    import torch

    from dinoforge.core.artifact import load_artifact
    from dinoforge.core.preprocess import preprocess_image

    art = load_artifact(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack([preprocess_image(im, art.card.preprocessing) for im in images[start:start + batch_size]])
            out.append(art.backbone.forward_dino(x)["x_norm_clstoken"].numpy())
    return np.concatenate(out)


def calibrate_threshold(model: str, spec: str, *, target_recall: float = 0.97, transforms: CopyTransforms | None = None,
                        seed: int = 0) -> dict[str, float]:
    """Dedup threshold from held-out images: the similarity that ``target_recall`` of their copies reach.

    Copies of every image of ``spec`` (keep it disjoint from the pool under test) are embedded with
    ``model``; the threshold is the ``1 - target_recall`` quantile of original-copy cosine similarities. The
    report also says how often a copy's most similar *other* image reaches the threshold (a false-merge rate
    estimate at the calibration set's size).
    """
    from dinoforge.core.data import iter_good, open_source

    source = open_source(spec)
    rng = np.random.default_rng(seed)
    originals = [s.image for s in iter_good(source)]
    copies = [make_copy(im, rng, transforms or CopyTransforms()) for im in originals]
    a = l2_normalize(embed_images(model, originals), inplace=True)
    b = l2_normalize(embed_images(model, copies), inplace=True)
    sims = b @ a.T  # [n copies, n originals]
    positive = np.diag(sims).copy()
    np.fill_diagonal(sims, -1.0)
    impostor = sims.max(axis=1)
    threshold = float(np.quantile(positive, 1.0 - target_recall))
    return {"threshold": threshold, "images": len(originals), "target_recall": target_recall,
            "positive_median": float(np.median(positive)), "impostor_median": float(np.median(impostor)),
            "impostor_above_threshold": float((impostor >= threshold).mean()),
            "copy_top1": float((positive > impostor).mean())}
