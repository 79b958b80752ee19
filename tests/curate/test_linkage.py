"""The two grouping rules of the dedup step: connected components and "attach to a kept image"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dinoforge.core.runtime import init_runtime
from dinoforge.curate.dedup_tool import group_vectors
from dinoforge.curate.linkage import attach_to_kept, group_edges
from dinoforge.curate.state import RunState


def reference_kept(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The rule as written, row by row over a dense similarity table."""
    table = np.full((n, n), -np.inf)
    for i, j, s in zip(a, b, w, strict=True):
        if i != j:
            table[i, j] = table[j, i] = max(table[i, j], s)
    root = np.arange(n)
    for row in range(n):
        kept = [j for j in range(row) if root[j] == j and np.isfinite(table[row, j])]
        if kept:
            root[row] = max(kept, key=lambda j: (table[row, j], -j))
    return root


def test_kept_rule_matches_its_definition_on_random_graphs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = 40, 60
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        w = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9], m)  # ties too: the smaller row wins
        np.testing.assert_array_equal(attach_to_kept(n, a, b, w), reference_kept(n, a, b, w))


def test_a_chain_joins_under_components_but_not_under_kept() -> None:
    # 0 ~ 1 and 1 ~ 2, but 0 and 2 are unlike: components removes 1 and 2, kept removes 1 only.
    edges = [{"a": np.array([1, 2]), "b": np.array([0, 1]), "similarity": np.array([0.8, 0.8])}]
    assert group_edges(3, edges, "components")[0].tolist() == [0, 0, 0]
    assert group_edges(3, edges, "kept")[0].tolist() == [0, 0, 2]
    # Row 3 is like both kept rows 0 and 2: it joins the more similar one.
    edges.append({"a": np.array([3, 3]), "b": np.array([0, 2]), "similarity": np.array([0.5, 0.9])})
    roots, count = group_edges(4, edges, "kept")
    assert roots.tolist() == [0, 0, 2, 2] and count == 4


def test_exact_copies_follow_their_first_row() -> None:
    # Row 1 is removed as a near-duplicate of 0; row 3 is pixel-identical to row 1 (never indexed).
    edges = [{"a": np.array([1]), "b": np.array([0]), "similarity": np.array([0.9])}, {}]
    for linkage in ("components", "kept"):
        roots, _ = group_edges(4, iter(edges), linkage, (np.array([1]), np.array([3])))
        assert roots.tolist() == [0, 0, 2, 0]
    assert group_edges(3, [], "kept")[0].tolist() == [0, 1, 2]  # no edge above the threshold: all kept
    with pytest.raises(ValueError, match="linkage"):
        group_edges(4, edges, "single")  # type: ignore[arg-type]


def test_dedup_step_groups_by_the_chosen_rule(tmp_path: Path) -> None:
    angle = np.deg2rad([0.0, 40.0, 80.0])  # neighbours at cos 40 deg = 0.77; the ends at cos 80 deg = 0.17
    vectors = np.stack([np.cos(angle), np.sin(angle), np.zeros(3)], axis=1).astype(np.float32)
    ids = ["a", "b", "c"]
    removed = {}
    for linkage in ("components", "kept"):
        state = RunState(tmp_path / linkage, init_runtime("cpu"))
        report = group_vectors(state, vectors, ids, 0.7, 2, f"test-{linkage}", linkage)
        assert report["linkage"] == linkage
        removed[linkage] = pq.read_table(state.path("dedup", "removed.parquet")).column("id").to_pylist()
    assert sorted(removed["components"]) == ["b", "c"] and removed["kept"] == ["b"]
