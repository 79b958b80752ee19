"""A torch-free ``dinoforge[edge]`` virtual environment built from this source tree.

Used by ``bench/bench_edge.py`` and by ``tests/bench/test_edge_venv.py``: the tree (without virtual
environments, build outputs, runs, tests and docs) is copied, a fresh venv is created and ``pip install
"SRC[edge]"`` runs in it with pip's ordinary resolver, so the environment holds exactly what a device gets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Not part of an installable source tree (README.md stays: pyproject's readme).
SKIP = (".venv*", "build", "dist", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "tests", "docs", "bench")
#: What the edge install must not contain.
TRAINING_MODULES = ("torch", "torchvision", "timm", "faiss")


def copy_source(dest: Path, repo: Path = REPO) -> Path:
    """Copy the installable part of ``repo`` to ``dest`` (which must not exist)."""
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(*SKIP))
    return dest


def build_edge_venv(root: Path, *, timeout_s: float = 1800) -> Path:
    """Create ``root/venv`` with ``pip install "SRC[edge]"`` from a copy of this tree; returns its python.

    Raises:
        subprocess.CalledProcessError: pip failed (its output is in the exception).
    """
    src = copy_source(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout_s)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{src}[edge]"],
                   check=True, timeout=timeout_s, capture_output=True, text=True)
    shutil.rmtree(src)  # the venv holds an installed copy, not a link to the source
    return python


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks not followed)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def importable(python: Path, module: str) -> bool:
    """Whether ``python -c "import MODULE"`` succeeds."""
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False).returncode == 0
