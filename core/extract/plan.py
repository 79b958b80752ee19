"""The deterministic work plan of an extraction job and the on-disk record of what is done.

The inputs are cut into **units** that never change for a given job, so a restarted job redoes exactly the
units that are missing:

* indexed sources (folders, manifests, Fashion-MNIST, subsets): unit ``u`` holds inputs
  ``[u * shard_size, (u + 1) * shard_size)`` in the source's deterministic order;
* WebDataset sources: one unit per tar shard (its rows are split into parts of ``shard_size``).

Ranks take units round-robin (unit ``u`` belongs to rank ``u % world_size``). The job's identity (model hash,
input, features, dtype, format, shard size, preprocessing, unit list) is written to ``extract.json``; a
restart with different settings is refused rather than mixing two jobs in one folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dinoforge.core.data import DataSource, IndexedSource, WebDatasetSource
from dinoforge.core.errors import DataError
from dinoforge.core.fileio import atomic_write_json

JOB_FILE = "extract.json"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1
#: Settings that define a job (a restart must repeat them); everything else may change between runs.
IDENTITY_KEYS = ("model_sha256", "input", "features", "dtype", "format", "shard_size", "preprocess", "units")


@dataclass(frozen=True)
class Unit:
    """One piece of work: a range of an indexed source, or one tar of a WebDataset."""

    index: int
    start: int | None = None
    stop: int | None = None
    tar: str | None = None

    @property
    def name(self) -> str:
        """Directory name of the unit under ``shards/``."""
        return f"{self.index:05d}"

    @property
    def size(self) -> int | None:
        """Inputs in the unit (``None`` for a tar: unknown until read)."""
        return None if self.start is None or self.stop is None else self.stop - self.start


def plan_units(source: DataSource, shard_size: int) -> list[Unit]:
    """Cut ``source`` into units (see the module docstring).

    Raises:
        DataError: a streaming source that is not a WebDataset, or tar shards with clashing file names.
    """
    if isinstance(source, IndexedSource):
        n = len(source)
        return [Unit(i, start, min(start + shard_size, n)) for i, start in enumerate(range(0, n, shard_size))]
    if isinstance(source, WebDatasetSource):
        names = [p.name for p in source.shards]
        if len(set(names)) != len(names):
            raise DataError("WebDataset shards must have distinct file names (sample ids start with them)")
        # the shard's URL as given (a remote one keeps its scheme; str() of its PurePath would fold "//")
        return [Unit(i, tar=url) for i, url in enumerate(source.urls)]
    raise DataError(f"{source.spec}: extraction reads indexed sources (folders, manifests, fmnist) or "
                    "WebDataset tar shards; slices of a stream cannot be resumed — select a subset of the "
                    "shards instead")


def units_of_rank(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """The units rank ``rank`` of ``world_size`` processes."""
    return [u for u in units if u.index % world_size == rank]


def job_spec(*, model_sha256: str | None, model: str, input_spec: str, features: tuple[str, ...], dtype: str,
             fmt: str, shard_size: int, preprocess: dict[str, Any], units: list[Unit], embed_dim: int,
             num_inputs: int | None) -> dict[str, Any]:
    """The content of ``extract.json``."""
    return {"format_version": FORMAT_VERSION, "model": model, "model_sha256": model_sha256, "input": input_spec,
            "features": list(features), "dtype": dtype, "format": fmt, "shard_size": shard_size,
            "preprocess": preprocess, "embed_dim": embed_dim, "num_inputs": num_inputs,
            "units": [asdict(u) for u in units]}


def read_job(out_dir: Path) -> dict[str, Any] | None:
    """``extract.json`` of ``out_dir``, or ``None`` when there is none."""
    path = out_dir / JOB_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); remove the output folder to start over") from err


def claim_output(out_dir: Path, spec: dict[str, Any]) -> bool:
    """Write ``extract.json`` for a new job, or check that an existing one describes the same job.

    Returns:
        True when an earlier run of this job is being resumed.

    Raises:
        DataError: the folder holds another job, or files that are not an extraction output.
    """
    existing = read_job(out_dir)
    if existing is None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DataError(f"{out_dir} exists and is not an extraction output; choose an empty or new --output")
        atomic_write_json(out_dir / JOB_FILE, spec)
        return False
    different = [k for k in IDENTITY_KEYS if existing.get(k) != spec.get(k)]
    if different:
        raise DataError(f"{out_dir} holds another extraction job (different {', '.join(different)}); "
                        "rerun with the same arguments to resume it, or choose a new --output")
    return True


def check_claim(out_dir: Path, spec: dict[str, Any]) -> None:
    """Non-writing variant for ranks other than 0: the job file must exist and match."""
    existing = read_job(out_dir)
    if existing is None or any(existing.get(k) != spec.get(k) for k in IDENTITY_KEYS):
        raise DataError(f"{out_dir}/{JOB_FILE} is missing or describes another job: rank 0 writes it, so every "
                        "rank must see the same --output folder (on several nodes: a shared filesystem)")


def done_units(out_dir: Path) -> set[str]:
    """Names of the units whose directories are complete (renamed into place)."""
    root = out_dir / SHARDS_DIR
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def remove_stale_staging(out_dir: Path, units: list[Unit]) -> int:
    """Delete temporary directories left by killed runs for the given (not yet done) units."""
    root = out_dir / SHARDS_DIR
    removed = 0
    for unit in units:
        for stale in root.glob(f".{unit.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
            removed += 1
    return removed
