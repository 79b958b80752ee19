"""Smoke test of bench/bench_int8.py: every int8 variant is built, runs and stays close to fp32 (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.conftest import RunBench

pytestmark = pytest.mark.slow  # one export, two fusions, four quantizations, seven sessions


def test_every_variant_runs_and_keeps_the_embedding(run_bench: RunBench, tmp_path: Path) -> None:
    out = tmp_path / "int8.json"
    done = run_bench("bench_int8.py", "--quick", "--profile", "--resolution", "42", "--instances", "2",
                     "--json", str(out), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "fp32 +SkipLN", "fused fp32", "qdq (cpu)", "dynamic, unfused", "dynamic",
                         "dynamic +SkipLN"}  # no stem: no "mixed" or "+convs" variant
    # one fused attention, one bias + GELU per block (2 blocks); residual + LayerNorm stay unfused
    assert result["fused_operators"] == {"Attention": 2, "BiasGelu": 2, "LayerNormalization": 5}
    assert result["random_weights"] is True
    assert result["resolution"] == 42 and result["instances"] == 2  # --resolution: exported at 42 px, not the card's 56
    # --profile: where each graph's time goes, by operator type
    assert rows["fp32"]["profile_ms"]["MatMul"] > 0 and "QAttention" not in rows["fp32"]["profile_ms"]
    assert rows["dynamic"]["profile_ms"]["QAttention"] > 0 and "Attention" not in rows["dynamic"]["profile_ms"]
    assert rows["fused fp32"]["profile_ms"]["Attention"] > 0
    for name in ("fp32 +SkipLN", "fused fp32"):
        assert rows[name]["min_cosine_vs_fp32"] > 0.99999, name  # fusion alone changes nothing
    for name, row in rows.items():
        assert row["min_cosine_vs_fp32"] > 0.99, name
        assert row["img_per_s"] > 0 and row["img_per_s_instances"] > 0 and "knn_drop_pt" in row, name
        if name not in ("fp32", "fp32 +SkipLN", "fused fp32"):
            assert row["bytes"] < 0.6 * rows["fp32"]["bytes"], name  # int8 weights
    assert f"{'variant':24s}" in done.stdout  # the table is printed
    assert "ms per run by operator type" in done.stdout


def test_a_resolution_off_the_patch_grid_is_refused_with_a_reason(run_bench: RunBench) -> None:
    done = run_bench("bench_int8.py", "--quick", "--resolution", "50", timeout=300)
    assert done.returncode != 0 and "not a multiple of patch_size 14" in done.stderr
    assert "Traceback" not in done.stderr
