"""Step 6 — the curated manifest that the pretraining data loader reads, and the run report.

The manifest has one row per selected pool image, in pool order:

====================  =========================================================================
``path``              image file (absolute) — the column the data layer's manifest reader needs
``label``             the pool's label when it has one (empty otherwise)
``id``                the pool sample id
``pool_row``          row in the pool's embedding store
``seed_set``          the seed set that retrieved it (first one in recipe order), empty for balance-only
``step``              ``sample`` (k-NN of a seed), ``cluster`` (cluster-based) or ``balance`` (no seeds)
``seed_id``           the seed image (sample-based retrieval)
``similarity``        cosine similarity to that seed (sample) or to the cluster centroid (cluster)
``balance_cluster``   finest balancing cluster (when balancing ran, else -1)
====================  =========================================================================

An image retrieved several times keeps its highest-similarity sample-based hit, else its cluster hit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.data.arrow_manifest import convert_manifest
from dinoforge.core.extract import FeatureStore
from dinoforge.core.fileio import atomic_open

MANIFEST_COLUMNS = ["path", "label", "id", "pool_row", "seed_set", "step", "seed_id", "similarity",
                    "balance_cluster"]


def retrieved_table(sample: pd.DataFrame | None, cluster: pd.DataFrame | None,
                    seed_order: list[str]) -> pd.DataFrame:
    """One row per retrieved pool image: pool_row, seed_set, step, seed_id, similarity."""
    parts = []
    if sample is not None and len(sample):
        parts.append(sample.assign(step="sample", order=0)[["pool_row", "seed_set", "step", "seed_id", "similarity",
                                                              "order"]])
    if cluster is not None and len(cluster):
        parts.append(cluster.assign(step="cluster", seed_id="", order=1)[["pool_row", "seed_set", "step", "seed_id",
                                                                         "similarity", "order"]])
    if not parts:
        return pd.DataFrame(columns=["pool_row", "seed_set", "step", "seed_id", "similarity"])
    both = pd.concat(parts, ignore_index=True)
    both["set_rank"] = both["seed_set"].map({n: i for i, n in enumerate(seed_order)})
    both = both.sort_values(["pool_row", "order", "set_rank", "similarity"], ascending=[True, True, True, False])
    return both.drop_duplicates("pool_row").drop(columns=["order", "set_rank"]).reset_index(drop=True)


def build_manifest(pool: FeatureStore, selected: pd.DataFrame, balance_cluster: np.ndarray | None) -> pd.DataFrame:
    """Join the selection with the pool's ids, paths and labels (``selected`` has a ``pool_row`` column)."""
    table = pool.table(["id", "path", "label"]).to_pandas()
    rows = selected["pool_row"].to_numpy(dtype=np.int64)
    out = pd.DataFrame({
        "path": table["path"].to_numpy()[rows], "label": table["label"].to_numpy()[rows],
        "id": table["id"].to_numpy()[rows],
        "pool_row": rows, "seed_set": selected.get("seed_set", pd.Series([""] * len(rows))).fillna("").to_numpy(),
        "step": selected.get("step", pd.Series(["balance"] * len(rows))).to_numpy(),
        "seed_id": selected.get("seed_id", pd.Series([""] * len(rows))).fillna("").to_numpy(),
        "similarity": selected.get("similarity", pd.Series([np.nan] * len(rows))).to_numpy(dtype=np.float32),
        "balance_cluster": balance_cluster if balance_cluster is not None else np.full(len(rows), -1)})
    out["label"] = out["label"].astype("Int64")  # nullable: unlabelled pools give empty cells
    return out.sort_values("pool_row").reset_index(drop=True)[MANIFEST_COLUMNS]


def write_manifest(manifest: pd.DataFrame, path: str, fmt: str) -> None:
    """Write the manifest atomically as CSV, parquet or an uncompressed Arrow IPC file.

    Arrow is the format a pretraining run at scale reads memory-mapped (:mod:`dinoforge.core.data.arrow_manifest`):
    it goes through a parquet file beside it and the data layer's converter, which checks the labels and records
    them in the file once.
    """
    if fmt == "arrow":
        staging = Path(path).with_name(Path(path).name + ".staging.parquet")
        try:
            write_manifest(manifest, str(staging), "parquet")
            convert_manifest(staging, path)
        finally:
            staging.unlink(missing_ok=True)
        return
    with atomic_open(path, "wb") as handle:
        if fmt == "csv":
            handle.write(manifest.to_csv(index=False).encode("utf-8"))
        else:
            pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), handle)
