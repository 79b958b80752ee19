"""The curation steps on precomputed embeddings, checked against brute-force numpy.

Planted structure: groups of near-duplicate pool vectors (self-dedup), pool vectors that nearly copy an
evaluation vector (relative dedup) and random seeds (retrieval). The run goes through ``run_curation`` with
``features:`` stores, as the 1M benchmark does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoforge.core.config import build_config
from dinoforge.core.extract import write_feature_store
from dinoforge.curate.config import CurateConfig
from dinoforge.curate.pipeline import run_curation
from tests.helpers import run_cli

DIM, SELF_T, REL_T, K = 32, 0.97, 0.9, 4


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(seed: int = 0) -> dict[str, np.ndarray]:
    """Pool with 60 duplicate groups (2-4 members) and 25 near-copies of evaluation vectors; seeds; evals."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    pool = centres[rng.integers(0, 40, 3000)] + 0.8 * rng.normal(size=(3000, DIM))
    evals = centres[rng.integers(0, 40, 30)] + 0.8 * rng.normal(size=(30, DIM))
    dupes = [pool[i] + 0.02 * rng.normal(size=(int(rng.integers(1, 4)), DIM)) for i in range(60)]
    leaks = evals[rng.integers(0, 30, 25)] + 0.05 * rng.normal(size=(25, DIM))
    pool = np.concatenate([pool, *dupes, leaks])[rng.permutation(3000 + sum(len(d) for d in dupes) + 25)]
    seeds = centres[rng.integers(0, 40, 50)] + 0.8 * rng.normal(size=(50, DIM))
    return {"pool": pool.astype(np.float32), "seeds": seeds.astype(np.float32), "evals": evals.astype(np.float32)}


def brute_self_dedup(x: np.ndarray) -> np.ndarray:
    """Rows removed by keeping the smallest row of each connected component of sim >= SELF_T."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    x16 = unit(x.astype(np.float16).astype(np.float32))
    a, b = np.nonzero(np.triu(x16 @ x16.T >= SELF_T, 1))
    _, labels = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(len(x), len(x))), directed=False)
    first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    return np.array([i for i, lab in enumerate(labels) if first[lab] != i])


def stores(tmp_path: Path, data: dict[str, np.ndarray]) -> dict[str, str]:
    out = {}
    for name, x in data.items():
        write_feature_store(tmp_path / name, [x[:1000], x[1000:]], num_rows=len(x), dim=DIM, shard_size=700,
                            fingerprint="planted-v1")
        out[name] = f"features:{tmp_path / name}"
    return out


def recipe(tmp_path: Path, specs: dict[str, str], kind: str, **extra: object) -> CurateConfig:
    index = {"kind": kind, "nlist": 16, "nprobe": 16} if kind == "ivf_flat" else {"kind": kind}
    data = {"output": str(tmp_path / "run"), "pool": specs["pool"], "seeds": {"s": specs["seeds"]},
            "eval_sets": {"e": specs["evals"]}, "embed": {},
            "dedup": {"k": 8, "threshold": SELF_T, "exact": False, "chunk_rows": 500, "index": index},
            "relative": {"threshold": REL_T},
            "retrieval": {"sample": {"k": K}, "cluster": {"enabled": True, "num_clusters": 20, "min_seed_hits": 4,
                                                          "per_cluster": 30, "max_per_seed_set": 200}},
            "manifest": {"plots": False}, **extra}
    return build_config(CurateConfig, data)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_steps_equal_brute_force(tmp_path: Path, kind: str) -> None:
    data = planted()
    report = run_curation(recipe(tmp_path, stores(tmp_path, data), kind))
    run = tmp_path / "run"
    pool, evals, seeds = data["pool"], data["evals"], data["seeds"]
    # Self-dedup: the same components as all-pairs brute force, first row of each kept.
    removed_self = pd.read_parquet(run / "dedup" / "removed.parquet")["row"].to_numpy()
    np.testing.assert_array_equal(np.sort(removed_self), brute_self_dedup(pool))
    assert report["steps"]["dedup"]["removed"] >= 60
    # Relative dedup: no kept image within the threshold of an evaluation image, and nothing removed needlessly.
    p16, e16 = unit(pool.astype(np.float16).astype(np.float32)), unit(evals.astype(np.float16).astype(np.float32))
    best = (p16 @ e16.T).max(axis=1)
    kept = np.setdiff1d(np.arange(len(pool)), removed_self)
    removed_rel = pd.read_parquet(run / "relative" / "removed.parquet")["row"].to_numpy()
    np.testing.assert_array_equal(np.sort(removed_rel), kept[best[kept] >= REL_T])
    candidates = np.setdiff1d(kept, removed_rel)
    assert (best[candidates] < REL_T).all() and removed_rel.size >= 10  # some leaks are self-duplicates
    # Sample-based retrieval through faiss == brute-force numpy top-k among the candidates.
    sample = pd.read_parquet(run / "retrieval" / "sample.parquet").sort_values(["seed_row", "rank"])
    sims = unit(seeds.astype(np.float16).astype(np.float32)) @ p16[candidates].T
    top = candidates[np.argsort(-sims, axis=1, kind="stable")[:, :K]]
    np.testing.assert_array_equal(sample["pool_row"].to_numpy().reshape(-1, K), top)
    # Cluster-based retrieval only takes candidates, at most per_cluster per cluster, under the cap.
    cluster = pd.read_parquet(run / "retrieval" / "cluster.parquet")
    assert set(cluster["pool_row"]) <= set(candidates) and len(cluster) <= 200
    assert (cluster.groupby("cluster").size() <= 30).all() and (cluster["seed_hits"] >= 4).all()
    # Manifest: the union of both retrievals, once each, in pool order.
    manifest = pd.read_csv(run / "manifest.csv")
    assert sorted(manifest["pool_row"]) == sorted(set(sample["pool_row"]) | set(cluster["pool_row"]))
    assert manifest["pool_row"].is_monotonic_increasing and report["rows_without_path"] == len(manifest)
    stats = report["steps"]["retrieval"]["sample"]["s"]
    assert stats["retrieved"] == 50 * K and stats["unique"] == len(set(sample["pool_row"]))


def test_rerun_skips_done_steps_and_reruns_changed_ones(tmp_path: Path) -> None:
    specs = stores(tmp_path, planted(1))
    cfg = recipe(tmp_path, specs, "flat")
    run_curation(cfg)
    steps = tmp_path / "run" / "steps"
    stamp = {p.name: p.stat().st_mtime_ns for p in steps.iterdir()}
    run_curation(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in steps.iterdir()} == stamp  # nothing re-ran
    changed = cfg.model_copy(update={"relative": cfg.relative.model_copy(update={"threshold": 0.95})})
    run_curation(changed)
    after = {p.name: p.stat().st_mtime_ns for p in steps.iterdir()}
    assert after["embed.json"] == stamp["embed.json"] and after["dedup.json"] == stamp["dedup.json"]
    assert all(after[s] != stamp[s] for s in ("relative.json", "retrieval.json", "manifest.json"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"]["relative"]["threshold"] == 0.95


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_ranks_give_the_single_process_result(tmp_path: Path) -> None:
    import yaml

    specs = stores(tmp_path, planted(2))
    single = recipe(tmp_path / "single", specs, "ivf_flat")
    run_curation(single)
    cfg = single.model_dump(mode="json")
    cfg["output"] = str(tmp_path / "ranks")
    (tmp_path / "ranks.yaml").write_text(yaml.safe_dump(cfg))
    done = run_cli("curate", "--config", str(tmp_path / "ranks.yaml"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    # Query chunks (500 rows each) were split over the ranks; the merged results are identical.
    assert len(list((tmp_path / "ranks" / "dedup" / "edges").glob("chunk-*.npz"))) == 7
    for name in ("dedup/removed.parquet", "relative/removed.parquet", "retrieval/sample.parquet", "manifest.csv"):
        a = pd.read_parquet(tmp_path / "single" / "run" / name) if name.endswith("parquet") else \
            pd.read_csv(tmp_path / "single" / "run" / name)
        b = pd.read_parquet(tmp_path / "ranks" / name) if name.endswith("parquet") else \
            pd.read_csv(tmp_path / "ranks" / name)
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
