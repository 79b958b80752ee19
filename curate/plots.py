"""PNG plots of a curation run: cluster sizes before/after balancing and retrieved images per seed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from dinoforge.core.data import IndexedSource, Sample, open_source
from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def cluster_size_histogram(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    """Histogram of finest-cluster sizes of the balancing input and of the balanced selection."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, sizes, title in ((axes[0], before, "before balancing"), (axes[1], after, "after balancing")):
        sizes = sizes[sizes > 0]
        bins = np.unique(np.geomspace(1, max(2, int(sizes.max(initial=1))) + 1, 30).astype(int))
        ax.hist(sizes, bins=bins, color="tab:blue" if title.startswith("before") else "tab:green")
        ax.set_xscale("log")
        ax.set_xlabel("images per cluster")
        ax.set_ylabel("clusters")
        ax.set_title(f"{title}: {int(sizes.sum())} images, {sizes.size} clusters")
    _save(fig, path)


def _image(store: FeatureStore, source: IndexedSource | None, row: int, cache: dict) -> Image.Image | None:
    if source is None:
        return None
    if "table" not in cache:
        cache["table"] = store.table(["source_index"])["source_index"].to_numpy()
    sample = source[int(cache["table"][row])]
    return sample.image if isinstance(sample, Sample) else None


def _open(store: FeatureStore) -> IndexedSource | None:
    source = open_source(store.job["input"])
    return source if isinstance(source, IndexedSource) else None


def retrieval_grid(seed_store: FeatureStore, pool_store: FeatureStore, pairs: list[tuple[int, list[int]]],
                   path: Path, title: str) -> bool:
    """One row per seed: the seed image, then its retrieved pool images. False when images are not readable."""
    seed_src, pool_src = _open(seed_store), _open(pool_store)
    if seed_src is None or pool_src is None or not pairs:
        return False
    cols = 1 + max(len(r) for _, r in pairs)
    fig, axes = plt.subplots(len(pairs), cols, figsize=(1.6 * cols, 1.7 * len(pairs)), squeeze=False)
    seed_cache: dict = {}
    pool_cache: dict = {}
    for i, (seed_row, pool_rows) in enumerate(pairs):
        images = [_image(seed_store, seed_src, seed_row, seed_cache)] + \
                 [_image(pool_store, pool_src, r, pool_cache) for r in pool_rows]
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(images) and images[j] is not None:
                ax.imshow(np.asarray(images[j]))
                if i == 0:
                    ax.set_title("seed" if j == 0 else f"#{j}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True
