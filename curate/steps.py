"""The balance and manifest steps, and the run report (steps 5 and 6; steps 1-4 have their own modules)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open, atomic_write_json
from dinoforge.core.index import SubsetVectors
from dinoforge.curate.balance import balanced_sample
from dinoforge.curate.config import BalanceConfig, CurateConfig
from dinoforge.curate.kmeans import hierarchical_kmeans
from dinoforge.curate.manifest import build_manifest, retrieved_table, write_manifest
from dinoforge.curate.plots import cluster_size_histogram, retrieval_grid
from dinoforge.curate.state import RunState


def run_balance(state: RunState, pool: FeatureStore, feature: str, rows: np.ndarray, cfg: BalanceConfig,
                seed: int) -> dict[str, Any]:
    """Hierarchical k-means of ``rows`` (sorted pool rows) and balanced sampling to ``target_size``."""
    started = time.perf_counter()
    tree = hierarchical_kmeans(SubsetVectors(pool.vectors(feature), rows), cfg.levels,
                               resampling_steps=cfg.resampling_steps, resample_size=cfg.resample_size,
                               niter=cfg.niter, seed=seed)
    chosen = balanced_sample(tree, cfg.target_size, seed=seed)  # positions in rows
    clusters = tree.point_clusters()  # [n, levels]
    columns = {"pool_row": rows[chosen]} | {f"level{lv}": clusters[chosen, lv] for lv in range(clusters.shape[1])}
    with atomic_open(state.path("balance", "selected.parquet")) as handle:
        pq.write_table(pa.table(columns), handle)
    np.savez(state.path("balance", "centroids.npz"), *tree.centroids)
    finest = clusters[:, 0]
    before = np.bincount(finest, minlength=tree.centroids[0].shape[0])
    after = np.bincount(finest[chosen], minlength=tree.centroids[0].shape[0])
    np.savez(state.path("balance", "cluster_sizes.npz"), before=before, after=after)
    top = clusters[:, -1]
    share_before = np.bincount(top) / max(1, top.size)
    share_after = np.bincount(top[chosen], minlength=share_before.size) / max(1, chosen.size)
    return {"input": int(rows.size), "selected": int(chosen.size), "levels": list(cfg.levels),
            "top_share_before": {"max": float(share_before.max()), "min": float(share_before.min())},
            "top_share_after": {"max": float(share_after.max()), "min": float(share_after.min())},
            "seconds": round(time.perf_counter() - started, 3)}


def _read(path: Any) -> pd.DataFrame | None:
    return pq.read_table(path).to_pandas() if path.is_file() else None


def selection(state: RunState, cfg: CurateConfig, candidates: np.ndarray) -> pd.DataFrame:
    """The images retrieval selected (or every candidate when there are no seed sets)."""
    if not cfg.seeds:
        return pd.DataFrame({"pool_row": candidates, "step": "balance"})
    sample = _read(state.root / "retrieval" / "sample.parquet") if cfg.retrieval.sample.enabled else None
    cluster = _read(state.root / "retrieval" / "cluster.parquet") if cfg.retrieval.cluster.enabled else None
    return retrieved_table(sample, cluster, list(cfg.seeds))


def _grid(state: RunState, cfg: CurateConfig, seeds: dict[str, FeatureStore], pool: FeatureStore) -> list[str]:
    sample = _read(state.root / "retrieval" / "sample.parquet")
    if sample is None or not len(sample) or cfg.manifest.grid_seeds == 0:
        return []
    made = []
    for name in cfg.seeds:
        part = sample[sample["seed_set"] == name].sort_values(["seed_row", "rank"])
        rows = part["seed_row"].drop_duplicates().to_numpy()[:cfg.manifest.grid_seeds]
        pairs = [(int(r), part[part["seed_row"] == r]["pool_row"].tolist()) for r in rows]
        path = state.path("plots", f"retrieved-{name}.png")
        if retrieval_grid(seeds[name], pool, pairs, path, f"seed set {name}: nearest kept pool images"):
            made.append(str(path.relative_to(state.root)))
    return made


def run_manifest(state: RunState, cfg: CurateConfig, pool: FeatureStore, seeds: dict[str, FeatureStore],
                 selected: pd.DataFrame, reports: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest, the plots and ``report.json``; returns the report."""
    balance = _read(state.root / "balance" / "selected.parquet") if cfg.balance.enabled else None
    leaf = None
    if balance is not None:
        selected = selected.merge(balance[["pool_row", "level0"]], on="pool_row", how="inner")
        leaf = selected.pop("level0").to_numpy()
    manifest = build_manifest(pool, selected, leaf)
    name = f"manifest.{cfg.manifest.format}"
    write_manifest(manifest, str(state.path(name)), cfg.manifest.format)
    plots: list[str] = []
    if cfg.manifest.plots:
        if cfg.balance.enabled:
            sizes = np.load(state.root / "balance" / "cluster_sizes.npz")
            cluster_size_histogram(sizes["before"], sizes["after"], state.path("plots", "cluster-sizes.png"))
            plots.append("plots/cluster-sizes.png")
        plots += _grid(state, cfg, seeds, pool)
    missing_paths = int(manifest["path"].isna().sum())
    report = {"manifest": name, "rows": int(len(manifest)), "pool": pool.num_rows,
              "by_step": manifest["step"].value_counts().to_dict(),
              "by_seed_set": manifest["seed_set"].value_counts().to_dict(), "plots": plots,
              "rows_without_path": missing_paths, "steps": reports}
    if missing_paths:
        report["warning"] = (f"{missing_paths} selected images have no file path (the pool is not file-backed); "
                             "the pretraining loader needs paths: curate a folder or manifest pool")
    atomic_write_json(state.path("report.json"), report)
    return report
