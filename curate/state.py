"""The run directory of a curation: where each step writes, and which steps are already done.

Each step writes its outputs atomically and then a marker ``steps/<step>.json`` holding a fingerprint of
everything it depended on (its settings and the fingerprints of the steps it read). On a rerun a step whose
marker matches is skipped; a changed setting re-runs that step and, through the fingerprints, every step
after it. Ranks other than 0 never write markers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel

from dinoforge.core.fileio import atomic_write_json, atomic_write_text
from dinoforge.core.runtime import Runtime, barrier

STEPS_DIR = "steps"


def fingerprint(*parts: Any) -> str:
    """SHA-256 (hex, 16 chars) of JSON-serialised parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """Paths and step markers of one run directory.

    Args:
        root: the run directory.
        info: this process's rank (markers are written by rank 0 only).
    """

    def __init__(self, root: str | Path, info: Runtime) -> None:
        self.root = Path(root)
        self.info = info
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """A path inside the run directory (parent folders created)."""
        out = self.root.joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def removed_rows(self, step: str) -> np.ndarray:
        """Sorted pool rows that a deduplication ``step`` (``dedup``, ``relative``) wrote to its
        ``removed.parquet``; empty when the step is disabled or did not run."""
        path = self.root / step / "removed.parquet"
        if not path.is_file():
            return np.zeros(0, dtype=np.int64)
        return np.sort(pq.read_table(path, columns=["row"])["row"].to_numpy()).astype(np.int64)

    def marker(self, step: str) -> dict[str, Any] | None:
        """The marker of ``step``, or ``None``."""
        path = self.root / STEPS_DIR / f"{step}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def is_done(self, step: str, fp: str) -> bool:
        """True when ``step`` finished with the same fingerprint."""
        marker = self.marker(step)
        return marker is not None and marker.get("fingerprint") == fp

    def begin(self, step: str, fp: str) -> Path:
        """Prepare ``<run>/<step>/`` for a run with fingerprint ``fp`` and return it.

        Files of an interrupted run with the same fingerprint are kept (the step resumes from them); files of a
        run with other settings are deleted first, so stale partial results are never mixed in.
        """
        work = self.root / step
        stamp = work / ".fingerprint"
        if self.info.is_main:
            if work.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != fp):
                shutil.rmtree(work)
            work.mkdir(parents=True, exist_ok=True)
            if not stamp.is_file():
                atomic_write_text(stamp, fp + "\n")
        barrier(self.info)
        return work

    def mark_done(self, step: str, fp: str, report: dict[str, Any]) -> None:
        """Record ``step`` as finished (rank 0), then wait for every rank."""
        if self.info.is_main:
            atomic_write_json(self.path(STEPS_DIR, f"{step}.json"),
                              {"step": step, "fingerprint": fp, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "report": report})
        barrier(self.info)

    def report(self, step: str) -> dict[str, Any]:
        """The report stored in a finished step's marker (empty when the step has not run)."""
        marker = self.marker(step)
        return dict(marker.get("report", {})) if marker else {}
