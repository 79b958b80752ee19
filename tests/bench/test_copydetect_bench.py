"""bench/bench_copydetect.py run as a user runs it, on a tiny real photo collection (every method that is
installed, the same pairs for all, the dedup check), and its table helper."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench_copydetect import table

from dinoforge.curate.copynet import DEFAULT_HEAD

from tests.bench.conftest import RunBench
from tests.curate.test_copy_head import tiny_photos


def test_bench_runs_on_a_tiny_pool(tmp_path: Path, run_bench: RunBench) -> None:
    """With the shipped head when there is one; without, the dinoforge column and its dedup are left out."""
    photos = tiny_photos(tmp_path / "photos")
    out = tmp_path / "out"
    proc = run_bench("bench_copydetect.py", "--photos", str(photos), "--out", str(out), "--originals", "4",
                     "--extra-refs", "1", "--distractors", "2", "--queries-per-original", "3", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    head = DEFAULT_HEAD.is_file()
    expected = {"gem-raw"} | ({"dinoforge"} if head else set()) | {name for name, module in (("phash", "imagehash"), ("pdq", "pdqhash"),
                                                                       ("imagededup-cnn", "imagededup"))
                                            if importlib.util.find_spec(module)}
    assert expected <= set(summary["results"])
    assert summary["queries"] == 4 * 3 + 2 and summary["references"] == 5
    for result in summary["results"].values():
        overall = result["metrics"]["overall"]
        assert 0.0 <= overall["muap"] <= 1.0 and overall["with_original"] == 12
    curves = summary["dedup_curves"]
    assert set(curves) == {"gem-raw"} | ({"dinoforge"} if head else set())
    checks = [point for curve in curves.values() for point in curve] + ([summary["dedup"]] if head else [])
    assert [c["threshold"] for c in curves["gem-raw"]] == [0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.60, 0.70, 0.80, 0.90]
    assert {c["linkage"] for c in checks} == {"kept"}  # the curves' default and the shipped head's rule
    for dedup in checks:
        assert dedup["injected_copies"] == 12 and dedup["pool"] == 5 + 14 and 0.0 <= dedup["recall"] <= 1.0
    assert ("dinoforge" in (out / "table.md").read_text().splitlines()[0]) == head
    if not head:
        assert "no copy head" in proc.stderr


def test_table_has_one_column_per_method() -> None:
    metrics = {"overall": {"muap": 0.5, "recall_at_p90": 0.25},
               "families": {"crop": {"muap": 0.75}, "jpeg": {"muap": 1.0}}}
    text = table({"a": {"seconds": 3.0, "metrics": metrics}, "b": {"seconds": 1.0, "metrics": metrics}})
    lines = text.strip().splitlines()
    assert lines[0] == "| | a | b |" and lines[2] == "| **muAP overall** | **0.500** | **0.500** |"
    assert lines[4] == "| seconds | 3 | 1 |" and lines[5] == "| crop | 0.750 | 0.750 |" and len(lines) == 7
