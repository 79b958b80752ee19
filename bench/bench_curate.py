"""Curation benchmarks (results go to docs/benchmarks.md#curation).

    python bench/bench_curate.py scale  [--rows 1000000 --dim 384 --seeds 10000]   # self-dedup + retrieval
    python bench/bench_curate.py copies [--pool 20000 --originals 1000 --epochs 10]  # copy detection
    python bench/bench_curate.py payoff [--budget-steps 3000]                          # curated vs random pool
    add --quick for a small smoke run; --workdir DIR keeps the files (default: a temporary folder)

``scale``: 1M x 384 float16 synthetic embeddings (a mixture of 10k clusters with 1% planted near-duplicate
groups; there is no real 1M set on this machine) are written as an extraction output, then ``dinoforge
curate`` deduplicates them (k = 64) and retrieves the 4 nearest kept images of 10k seeds. Reports wall time,
peak RSS, the index and its recall@10 against exact search on 1000 sampled queries, and the planted groups'
dedup precision/recall.

``copies``: a pool of >= 20k real images (Fashion-MNIST test + train[:N], tuxpaint stamps, foolbox samples,
scikit-image photos) with transformed copies (crop, flip, colour jitter, resize, JPEG) of 1k originals; a
copy-detection descriptor trained self-supervised on Fashion-MNIST train[30000:] (disjoint from the pool);
threshold calibrated on copies of other held-out images; dedup scored against the injected groups.

``payoff``: pretraining on a curated subset of a pool vs a random subset of the same size (see
docs/curation.md); it runs ``dinoforge pretrain`` twice and ``dinoforge eval knn`` twice.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curate_payoff import foolbox_data, run_payoff

from dinoforge.core.config import build_config
from dinoforge.core.extract import write_feature_store
from dinoforge.curate.config import CurateConfig
from dinoforge.curate.pipeline import run_curation


def machine() -> dict[str, Any]:
    """Machine and library versions for the results table."""
    import faiss
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------- scale
#: Latent dimension of the ``manifold`` distribution: image embeddings of trained models concentrate near a
#: low-dimensional subspace (a few dozen principal directions hold most of their variance).
LATENT_DIM = 32


def synthetic_chunks(rows: int, dim: int, *, clusters: int, dup_fraction: float, seed: int, chunk: int = 100_000,
                     distribution: str = "isotropic"):
    """Clustered vectors in chunks; ``dup_fraction`` of rows are near-copies of the row before them.

    ``isotropic``: centre + N(0, 0.06^2) in every one of the ``dim`` directions (intra-cluster cosine ~0.4; noise
    of full rank, the hardest case for IVF). ``manifold``: the same mixture drawn in a ``LATENT_DIM``-d space
    (noise 0.15 per latent direction), mapped by a fixed random orthonormal ``[LATENT_DIM, dim]`` matrix, plus
    N(0, 0.03^2) ambient noise (the top 32 principal directions then hold ~83% of the variance).

    Yields ``(vectors float16 [m, dim], is_dup bool [m])``.
    """
    if distribution == "hierarchical":
        yield from _hierarchical_chunks(rows, dim, clusters=clusters, dup_fraction=dup_fraction, seed=seed,
                                        chunk=chunk)
        return
    rng = np.random.default_rng(seed)
    manifold = distribution == "manifold"
    space = LATENT_DIM if manifold else dim
    centres = rng.normal(size=(clusters, space)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.normal(size=(dim, space)))[0].T.astype(np.float32) if manifold else None
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        x = centres[rng.integers(0, clusters, m)] + rng.normal(scale=0.15 if manifold else 0.06,
                                                               size=(m, space)).astype(np.float32)
        if basis is not None:
            x = x @ basis + rng.normal(scale=0.03, size=(m, dim)).astype(np.float32)
        yield _plant_copies(x, rng, dup_fraction)


def _plant_copies(x: np.ndarray, rng: np.random.Generator, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``fraction`` of the rows of ``x`` ``[m, d]`` by near-copies (cosine ~0.997) of the row before.

    A copy is never followed by another copy: the second would copy a row that is itself replaced.

    Returns:
        ``(float16 [m, d], is_copy bool [m])``.
    """
    dup = rng.random(len(x)) < fraction
    dup[0] = False
    dup[1:] &= ~dup[:-1]
    src = np.nonzero(dup)[0] - 1
    x[dup] = x[src] + rng.normal(scale=0.004, size=(src.size, x.shape[1])).astype(np.float32)
    return x.astype(np.float16), dup


def _hierarchical_chunks(rows: int, dim: int, *, clusters: int, dup_fraction: float, seed: int, chunk: int):
    """Concepts -> groups -> images: ``clusters // 100`` concept directions, 100 groups per concept (cosine
    ~0.6 between groups of one concept) and ~10 images per group (cosine ~0.85 between images of one group),
    like photos of one object or scene among others of the same kind. Same yields as :func:`synthetic_chunks`.
    """
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(max(1, clusters // 100), dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    groups = concepts[np.arange(10 * clusters) % len(concepts)]  # 10 * clusters groups of ~rows / (10 * clusters)
    groups = groups + rng.normal(scale=0.0417, size=groups.shape).astype(np.float32)
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        x = groups[rng.integers(0, len(groups), m)] + rng.normal(scale=0.0277, size=(m, dim)).astype(np.float32)
        yield _plant_copies(x, rng, dup_fraction)


def bench_scale(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows, dim, seeds = args.rows, args.dim, args.seeds
    clusters = max(10, rows // 100)
    is_dup = []

    def pool_chunks():
        for x, dup in synthetic_chunks(rows, dim, clusters=clusters, dup_fraction=0.01, seed=0,
                                       distribution=args.distribution):
            is_dup.append(dup)
            yield x

    started = time.perf_counter()
    write_feature_store(work / "pool", pool_chunks(), num_rows=rows, dim=dim, shard_size=100_000,
                        fingerprint="synthetic-v1")
    seed_x = next(synthetic_chunks(seeds, dim, clusters=clusters, dup_fraction=0.0, seed=0, chunk=seeds,
                                   distribution=args.distribution))[0]
    write_feature_store(work / "seeds", [seed_x], num_rows=seeds, dim=dim, fingerprint="synthetic-v1")
    written = time.perf_counter() - started
    cfg = build_config(CurateConfig, {
        "output": str(work / "run"), "pool": f"features:{work / 'pool'}",
        "seeds": {"seeds": f"features:{work / 'seeds'}"},
        "embed": {}, "dedup": {"k": 64, "threshold": 0.9, "exact": False,
                               "index": {"train_per_list": 40, "tune_queries": 1000,
                                         "flat_max": 5000 if args.quick else 65_536}},
        "retrieval": {"sample": {"k": 4}}, "manifest": {"plots": False}})
    started = time.perf_counter()
    report = run_curation(cfg)
    wall = time.perf_counter() - started
    planted = np.concatenate(is_dup)
    indexed = np.load(work / "run" / "dedup" / "index.rows.npy")  # rows in the index (all: no exact pass)
    import pandas as pd

    gone = pd.read_parquet(work / "run" / "dedup" / "removed.parquet")["row"].to_numpy()
    dedup, ret = report["steps"]["dedup"], report["steps"]["retrieval"]
    return {"rows": rows, "dim": dim, "seeds": seeds, "distribution": args.distribution,
            "write_seconds": round(written, 1),
            "curate_seconds": round(wall, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
            "index": dedup["index"]["plan"]["factory"], "search_params": dedup["index"]["search_params"],
            "recall@10": dedup["index"]["recall"]["recall"], "index_build_seconds": dedup["index"]["build_seconds"],
            "tune_seconds": dedup["index"]["tune_seconds"], "dedup_search_seconds": dedup["search_seconds"],
            "dedup_step_seconds": dedup["wall_seconds"], "retrieval_step_seconds": ret["wall_seconds"],
            "planted_dups": int(planted.sum()), "removed": int(gone.size),
            "planted_recall": float(np.isin(np.nonzero(planted)[0], gone).mean()),
            "planted_precision": float(np.isin(gone, np.nonzero(planted)[0]).mean()) if gone.size else 1.0,
            "indexed_rows": int(indexed.size), "retrieved_unique": ret["sample"]["seeds"]["unique"]}


# ---------------------------------------------------------------------------------------------- copies
def skimage_folder(folder: Path) -> Path:
    """The photos bundled with scikit-image (no download) as PNG files."""
    import skimage.data as data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
                 "moon", "page", "rocket", "text", "clock", "colorwheel", "logo", "hubble_deep_field"):
        try:
            Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
        except Exception:  # noqa: BLE001 - an image needing a download is simply left out
            continue
    return folder


def bench_copies(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dinoforge.core.data import open_source
    from dinoforge.curate.copydetect import calibrate_threshold, score_dedup, write_pool_with_copies
    from dinoforge.curate.descriptor import DescriptorConfig, train_descriptor

    fmnist_train = max(0, args.pool - 10_000 - 1000)
    foolbox = foolbox_data()
    if args.quick:
        sources = [open_source(f"fmnist:test[:{args.pool}]"), open_source(f"folder:{foolbox}")]
    else:
        sources = [open_source("fmnist:test"), open_source(f"fmnist:train[:{fmnist_train}]"),
                   open_source("folder:/usr/share/tuxpaint/stamps"), open_source(f"folder:{foolbox}"),
                   open_source(f"folder:{skimage_folder(work / 'skimage')}")]
    pool = write_pool_with_copies(sources, work / "pool", num_originals=args.originals, seed=0)
    model = args.model
    started = time.perf_counter()
    if model is None:
        model = str(train_descriptor(DescriptorConfig(data="fmnist:train[30000:]", out=str(work / "descriptor"),
                                                      epochs=args.epochs, max_steps=20 if args.quick else None)))
    trained = time.perf_counter() - started
    calib = calibrate_threshold(model, "fmnist:train[20000:21000]", target_recall=0.97, seed=1)
    cfg = build_config(CurateConfig, {"output": str(work / "run"), "pool": str(pool.folder),
                                      "embed": {"model": model, "num_workers": 2},
                                      "dedup": {"k": 64, "threshold": calib["threshold"]},
                                      "manifest": {"plots": False}})
    started = time.perf_counter()
    run_curation(cfg)
    import pandas as pd

    removed = pd.read_parquet(work / "run" / "dedup" / "removed.parquet")["id"].tolist()
    score = score_dedup(removed, pool.groups)
    return {"pool_images": pool.num_images, "groups": pool.num_groups, "descriptor": model,
            "descriptor_train_seconds": round(trained, 1), "calibration": calib,
            "curate_seconds": round(time.perf_counter() - started, 1), **score}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("scale", "copies", "payoff"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary folder)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--distribution", choices=("isotropic", "manifold", "hierarchical"), default="isotropic",
                        help="scale: synthetic embedding distribution (see synthetic_chunks)")
    parser.add_argument("--pool", type=int, default=20_000, help="copies: real pool images before injection")
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10, help="copies: descriptor training epochs")
    parser.add_argument("--model", help="copies: an existing copy-detection artifact instead of training one")
    parser.add_argument("--budget-steps", type=int, default=3000, help="payoff: pretraining steps per run")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="payoff: override of the fmnist pretraining recipe, after the budget's (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.seeds, args.pool, args.originals, args.budget_steps = 20_000, 200, 600, 30, 4
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runner = {"scale": bench_scale, "copies": bench_copies, "payoff": run_payoff}[args.mode]
        result = {"mode": args.mode, "quick": args.quick, **runner(args, work), "machine": machine()}
    print(f"## bench_curate {args.mode}{' (quick)' if args.quick else ''}\n")
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {json.dumps(value) if isinstance(value, (dict, list)) else value} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
