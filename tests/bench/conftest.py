"""Tests of the scripts in ``bench/``: they are run as a user runs them, and their helpers are imported.

``bench/`` is a folder of scripts, not a package: it goes on ``sys.path`` here, before the test modules are
collected, so they import ``knn_paired``, ``bench_curate``, ... by name.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH_DIR))

RunBench = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def run_bench() -> RunBench:
    """``run_bench("knn_paired.py", *args, cwd=..., timeout=...)``: a script run by this interpreter, output kept."""

    def run(script: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH_DIR / script), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, check=False)

    return run


@pytest.fixture(scope="module")
def random_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``test`` backbone, randomly initialised by ``dinoforge init`` (the model card's default preprocessing)."""
    art = tmp_path_factory.mktemp("bench") / "rand"
    subprocess.run([sys.executable, "-m", "dinoforge.core.cli", "init", "test", "--out", str(art)], check=True,
                   capture_output=True)
    return art
