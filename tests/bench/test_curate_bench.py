"""bench_curate's synthetic embeddings have the documented geometry, and bench/copy_difficulty.py scores copies
as documented (docs/benchmarks.md#curation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_curate import synthetic_chunks
from copy_difficulty import separability

from tests.bench.conftest import RunBench


def _neighbour_cosines(x: np.ndarray, queries: int) -> np.ndarray:
    """Cosine of each of the first ``queries`` rows to every other row, best first: ``[queries, n]``."""
    x = x.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x[:queries] @ x.T  # [q, n]
    sims[np.arange(queries), np.arange(queries)] = -1.0
    return np.sort(sims, axis=1)[:, ::-1]


def test_hierarchical_embeddings_have_tight_groups_and_planted_copies() -> None:
    x, dup = next(synthetic_chunks(50_000, 384, clusters=500, dup_fraction=0.01, seed=0, chunk=50_000,
                                   distribution="hierarchical"))
    assert x.dtype == np.float16 and x.shape == (50_000, 384) and 0.005 < dup.mean() < 0.02
    sims = _neighbour_cosines(x, 500)
    assert np.median(sims[:, 0]) > 0.8  # images of one group
    assert np.median(sims[:, 11]) < 0.7  # beyond the ~10 images of a group: other groups of the concept
    assert abs(np.median(sims)) < 0.1  # most pairs: different concepts, unrelated directions
    planted = np.nonzero(dup)[0]
    a = x[planted].astype(np.float32)
    b = x[planted - 1].astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99  # near-copies of the row before them


def test_isotropic_embeddings_have_weak_neighbours() -> None:
    x, _ = next(synthetic_chunks(20_000, 384, clusters=200, dup_fraction=0.0, seed=0, chunk=20_000))
    sims = _neighbour_cosines(x, 300)
    # the 10th neighbour is barely closer than the 50th: the documented worst case for partition indexes
    assert np.median(sims[:, 9]) - np.median(sims[:, 49]) < 0.1


def test_separability_scores_a_known_similarity_matrix() -> None:
    # 20 copies of the first 20 of 40 images; copy i scores 0.9 + i/1000 with its original, 0.5 elsewhere,
    # except copy 0 whose best impostor (image 30) scores 0.95
    sims_copy = np.full((20, 40), 0.5)
    sims_copy[np.arange(20), np.arange(20)] = 0.9 + np.arange(20) / 1000
    sims_copy[0, 30] = 0.95
    sims_pool = np.full((40, 40), 0.2)
    sims_pool[5, 6] = sims_pool[6, 5] = 0.92  # one natural near-pair above the threshold
    np.fill_diagonal(sims_pool, 1.0)  # ignored
    r = separability(sims_copy, sims_pool, np.arange(20))
    assert r["top1"] == pytest.approx(19 / 20)
    assert r["threshold"] == pytest.approx(np.quantile(0.9 + np.arange(20) / 1000, 0.05))
    assert r["impostor_above"] == pytest.approx(1 / 20)
    assert r["natural_above"] == pytest.approx(2 / 40)


def test_copy_difficulty_runs_on_real_images(tmp_path: Path, run_bench: RunBench) -> None:
    out = tmp_path / "difficulty.json"
    res = run_bench("copy_difficulty.py", "--source", "fmnist:test[:200]", "--copies", "20", "--out", str(out),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(0 <= r["top1"] <= 1 and -1 <= r["threshold"] <= 1 for r in rows)
    assert "| pixels 28px blur 0.0 |" in res.stdout
    bad = run_bench("copy_difficulty.py", "--source", "fmnist:test[:10]", "--copies", "20")
    assert bad.returncode != 0 and "exceeds the 10 images" in bad.stderr
    none = run_bench("copy_difficulty.py", "--copies", "0")
    assert none.returncode == 2 and "--copies must be >= 1" in none.stderr
