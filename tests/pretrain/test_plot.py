"""``dinoforge plot``: PNG curves from metrics.jsonl, robust to a torn last line, clear errors otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dinoforge.core.cli import main as cli_main
from dinoforge.core.errors import DataError
from dinoforge.pretrain.monitor import MetricsLog, read_metrics
from dinoforge.pretrain.plot import plot_run


def _write_run(run_dir: Path) -> None:
    log = MetricsLog(run_dir)
    for step in range(1, 41):
        log.write({"step": step, "total_loss": 11.0 - step * 0.1, "ibot_loss": 2.0 / step, "lr": step * 1e-4,
                   "teacher_entropy": 0.9, "feature_std": 0.5})
    log.write({"step": 40, "knn_top1": 71.5, "knn_top5": 97.0})
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 41, "total_lo')  # a killed run can leave a torn last line


def test_plot_groups_with_data(tmp_path: Path) -> None:
    _write_run(tmp_path)
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["collapse.png", "knn.png", "losses.png", "schedules.png"]
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 300
    assert not list((tmp_path / "plots").glob(".*tmp"))  # atomic writes leave no temporaries


def test_metrics_reader_and_truncation(tmp_path: Path) -> None:
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    assert len(records) == 41 and records[-1]["knn_top1"] == 71.5  # torn line skipped
    MetricsLog(tmp_path).truncate_after(10)  # what a resume from the step-10 checkpoint does
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataError, match="not a run directory"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "note": "no numbers to plot"}\n')
    with pytest.raises(DataError, match="no plottable metrics"):
        plot_run(tmp_path)
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_knn_on_different_sets_gets_one_line_per_set() -> None:
    from dinoforge.pretrain.plot import _series

    records = [{"step": 0, "knn_top1": 69.3, "knn_n_train": 60000, "knn_n_test": 10000},
               {"step": 200, "knn_top1": 73.1, "knn_n_train": 5000, "knn_n_test": 2000},
               {"step": 400, "knn_top1": 75.0, "knn_n_train": 5000, "knn_n_test": 2000},
               {"step": 800, "knn_top1": 81.2, "knn_n_train": 60000, "knn_n_test": 10000},
               {"step": 10, "total_loss": 11.0}]
    assert _series(records, "knn_top1") == {"60000 train / 10000 test": ([0, 800], [69.3, 81.2]),
                                            "5000 train / 2000 test": ([200, 400], [73.1, 75.0])}
    assert _series(records, "total_loss") == {"": ([10], [11.0])}
    assert _series(records, "lr") == {}
