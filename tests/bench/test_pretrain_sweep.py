"""bench/pretrain_sweep.py runs its variants for real and rejects bad arguments before making any run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pretrain_sweep import Variant

from tests.bench.conftest import RunBench


@pytest.mark.slow
def test_pretrain_sweep_runs_each_variant_and_reports_it(tmp_path: Path, run_bench: RunBench) -> None:
    out = tmp_path / "sweep.json"
    res = run_bench("pretrain_sweep.py", "--smoke", "--workdir", str(tmp_path / "runs"), "--threads", "1",
                    "--out", str(out), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"base", "sk"}
    for r in results.values():
        assert r["rc"] == 0 and r["steps"] == 4 and 0 < r["teacher_entropy"] <= 1
    sk_config = (tmp_path / "runs" / "sk" / "config.yaml").read_text()
    assert "sinkhorn_knopp" in sk_config  # the override reached the run
    assert "| base | (recipe) | 4 |" in res.stdout


def test_pretrain_sweep_rejects_a_nameless_variant(tmp_path: Path, run_bench: RunBench) -> None:
    res = run_bench("pretrain_sweep.py", "--variant", "=x=1", cwd=tmp_path, timeout=60)
    assert res.returncode != 0 and "has no name" in res.stderr


def test_pretrain_sweep_keeps_list_values_of_a_variant_whole() -> None:
    v = Variant.parse("photo=crops.color_jitter=[0.2,0.2,0,0],crops.solarize_p=0,crops.ratio=[0.75,1.33]")
    assert v.name == "photo"
    assert v.overrides == ["crops.color_jitter=[0.2,0.2,0,0]", "crops.solarize_p=0", "crops.ratio=[0.75,1.33]"]
    assert Variant.parse("base=").overrides == []


def test_pretrain_sweep_rejects_zero_parallel_runs(tmp_path: Path, run_bench: RunBench) -> None:
    res = run_bench("pretrain_sweep.py", "--parallel", "0", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "--parallel and --threads must be >= 1" in res.stderr
    assert not (tmp_path / "runs").exists()  # rejected before any run folder is made
