"""bench/bench_shard_memory.py end to end on the tiny recipe (2 gloo ranks against one process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_shard_memory.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_step_case_reports_every_rank_with_a_recipe_override() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--case", "step", "--recipe", "tiny", "--nproc", "2",
                           "--set", "train.host_mmap_threshold_mib=4"], capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["strategy"] == "fsdp" and len(result["ranks_mb"]) == 2
    assert result["single_mb"] > 100 and all(mb > 100 for mb in result["ranks_mb"])
    assert abs(result["max_ratio"] - max(result["ranks_mb"]) / result["single_mb"]) < 0.002  # MB are rounded


def test_bad_override_is_one_clear_failure() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--case", "step", "--recipe", "tiny", "--nproc", "2",
                           "--only", "single", "--set", "train.host_mmap_threshold_mib=64"],
                          capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode != 0
    assert "host_mmap_threshold_mib" in done.stderr
