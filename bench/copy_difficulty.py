"""How separable are injected copies from natural neighbours? (docs/benchmarks.md#curation, copy detection)

    python bench/copy_difficulty.py [--source fmnist:test[:3000]] [--copies 300] [--model ARTIFACT] [--out F]

Copies ``--copies`` images of ``--source`` with the acceptance transforms (``CopyTransforms`` defaults: crop,
flip, colour jitter, resize, JPEG) and embeds originals and copies with simple pixel descriptors (grey
thumbnails at several sizes and blurs, centred and L2-normalised, flip-symmetrised similarity) and, with
``--model``, a model artifact's CLS token. For each descriptor it reports:

* ``top1``: fraction of copies whose most similar source image is their original;
* ``threshold``: the similarity 95% of copies reach with their original (the threshold a dedup needs for
  recall 0.95);
* ``impostor_above``: fraction of copies whose most similar *other* image also reaches it;
* ``natural_above``: fraction of source images with a natural neighbour (another source image) at or above
  it, i.e. images the dedup would wrongly merge at that threshold.

A descriptor can reach recall 0.95 at precision 0.9 only if both fractions are small. Runs in ~1 minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from dinoforge.core.index.vectors import l2_normalize

DESCRIPTORS = ((28, 0.0), (28, 1.0), (28, 2.0), (14, 0.0), (14, 1.0), (7, 0.0))


def _thumbnail(image: Image.Image, size: int, blur: float) -> np.ndarray:
    grey = image.convert("L").resize((28, 28), Image.Resampling.BICUBIC)
    if blur:
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(grey.resize((size, size), Image.Resampling.BOX), np.float32)


def _centred_unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[n, ...]`` flattened, centred and L2-normalised: float32 ``[n, d]``.

    Centring each thumbnail makes the pixel similarity a correlation, blind to the brightness jitter.
    """
    x = x.reshape(len(x), -1).astype(np.float32)
    return l2_normalize(x - x.mean(axis=1, keepdims=True), inplace=True)


def separability(sims_copy: np.ndarray, sims_pool: np.ndarray, originals: np.ndarray) -> dict[str, float]:
    """Scores of one descriptor.

    Args:
        sims_copy: ``[m copies, n source images]`` similarities.
        sims_pool: ``[n, n]`` similarities between source images (the diagonal is ignored).
        originals: ``[m]`` index of each copy's original.
    """
    rows = np.arange(len(originals))
    true = sims_copy[rows, originals]
    others = sims_copy.copy()
    others[rows, originals] = -np.inf
    impostor = others.max(axis=1)
    threshold = float(np.quantile(true, 0.05))
    pool = sims_pool.copy()
    np.fill_diagonal(pool, -np.inf)
    return {"top1": float((true > impostor).mean()), "threshold": threshold,
            "impostor_above": float((impostor >= threshold).mean()),
            "natural_above": float((pool.max(axis=1) >= threshold).mean())}


def _pixel_rows(images: list[Image.Image], copies: list[Image.Image], originals: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for size, blur in DESCRIPTORS:
        pool = np.stack([_thumbnail(im, size, blur) for im in images])
        p, flipped = _centred_unit(pool), _centred_unit(pool[:, :, ::-1])
        c = _centred_unit(np.stack([_thumbnail(im, size, blur) for im in copies]))
        # flip-symmetrised: a copy may be mirrored
        rows.append({"descriptor": f"pixels {size}px blur {blur}", **separability(
            np.maximum(c @ p.T, c @ flipped.T), np.maximum(p @ p.T, p @ flipped.T), originals)})
    return rows


def run(source: str, num_copies: int, model: str | None, seed: int = 0) -> dict[str, Any]:
    from dinoforge.core.data import iter_good, open_source
    from dinoforge.curate.copydetect import CopyTransforms, embed_images, make_copy

    images = [s.image for s in iter_good(open_source(source))]
    if num_copies > len(images):
        raise SystemExit(f"error: --copies {num_copies} exceeds the {len(images)} images of {source}")
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(images), size=num_copies, replace=False)
    copies = [make_copy(images[i], rng, CopyTransforms()) for i in originals]
    rows = _pixel_rows(images, copies, originals)
    if model:
        p, c = l2_normalize(embed_images(model, images)), l2_normalize(embed_images(model, copies))
        rows.append({"descriptor": f"model {model}", **separability(c @ p.T, p @ p.T, originals)})
    return {"source": source, "images": len(images), "copies": num_copies, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="fmnist:test[:3000]", help="a core data source spec")
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--model", help="also score this artifact's CLS token")
    parser.add_argument("--out", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.copies < 1:
        parser.error("--copies must be >= 1")
    result = run(args.source, args.copies, args.model)
    print(f"{result['images']} images of {args.source}, {args.copies} copies")
    print("| descriptor | copy top-1 | threshold for recall 0.95 | copies with an impostor above | "
          "images with a natural neighbour above |\n|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['descriptor']} | {r['top1']:.2f} | {r['threshold']:.3f} | {r['impostor_above']:.2f} | "
              f"{r['natural_above']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
