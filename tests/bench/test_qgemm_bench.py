"""bench/bench_qgemm.py: both forms of a linear layer compute the same product; the script runs and reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from bench_qgemm import graphs

from dinoforge.core.ort_session import create_session
from tests.bench.conftest import RunBench


def test_int8_form_computes_the_fp32_product() -> None:
    x = np.random.default_rng(3).standard_normal((40, 32)).astype(np.float32)  # [M, K]
    out = {form: create_session(model, threads=1).run(None, {"x": x})[0] for form, model in graphs(40, 32, 24).items()}
    assert out["fp32"].shape == out["int8"].shape == (40, 24)
    rel = np.abs(out["int8"] - out["fp32"]).max() / np.abs(out["fp32"]).max()
    assert 0 < rel < 0.03  # int8: close, not equal


def test_quick_run_reports_every_shape_and_thread_count(run_bench: RunBench, tmp_path: Path) -> None:
    out = tmp_path / "qgemm.json"
    done = run_bench("bench_qgemm.py", "--shape", "48,32,16", "--threads", "1", "2", "--iters", "3", "--rounds", "1",
                     "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["threads"], r["form"]) for r in rows} == {(1, "fp32"), (1, "int8"), (2, "fp32"), (2, "int8")}
    assert all(r["us"] > 0 and r["gmac_per_s"] > 0 for r in rows)
    assert "int8 thread gain" in done.stdout and "48 x 32 x 16" in done.stdout
    bad = run_bench("bench_qgemm.py", "--shape", "48,0,16")
    assert bad.returncode == 2 and "positive" in bad.stderr
