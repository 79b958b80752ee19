"""The finished extraction output: merged tables and memory-mapped feature shards.

Layout of an output folder::

    extract.json           the job (model hash, input, features, dtype, format, shard size, units)
    shards/00000/...       one directory per unit (see :mod:`dinoforge.core.extract.writer`)
    index.parquet          id, path, label, source_index, content_hash, shard ("00000/part-000"),
                           row (inside the shard), global_row
    bad.parquet            id, path, reason, unit  — the inputs that were skipped
    summary.json           rows, bad, units, timings

``index.parquet`` lists every extracted input exactly once, in global row order (units in order, parts in
order, rows in order); for indexed sources that is the source's order without the skipped inputs.
:class:`FeatureStore` reads it and exposes each feature as float16/float32 memory maps, e.g. as a
:class:`~dinoforge.core.index.ShardedVectors` for the index layer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinoforge.core.errors import DataError
from dinoforge.core.extract.plan import JOB_FILE, SHARDS_DIR, read_job
from dinoforge.core.extract.writer import BAD_SCHEMA, UNIT_FILE
from dinoforge.core.fileio import atomic_open, atomic_write_json
from dinoforge.core.index.vectors import ShardedVectors

INDEX_FILE = "index.parquet"
BAD_FILE = "bad.parquet"
SUMMARY_FILE = "summary.json"
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.int64()),
                          ("source_index", pa.int64()), ("content_hash", pa.string()), ("shard", pa.string()),
                          ("row", pa.int64()), ("global_row", pa.int64())])


def _unit_summaries(out_dir: Path, job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    units = []
    for unit in job["units"]:
        name = f"{unit['index']:05d}"
        path = out_dir / SHARDS_DIR / name / UNIT_FILE
        if not path.is_file():
            raise DataError(f"unit {name} of {out_dir} is not done; rerun the same extract command to finish")
        units.append((name, json.loads(path.read_text())))
    return units


def finalize(out_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the units' tables into ``index.parquet`` and ``bad.parquet`` and write ``summary.json``.

    Idempotent: running it again rewrites the same files. Every file is written atomically.
    """
    job = read_job(out_dir)
    if job is None:
        raise DataError(f"{out_dir} has no {JOB_FILE}: not an extraction output")
    units = _unit_summaries(out_dir, job)
    total = bad_total = 0
    with atomic_open(out_dir / INDEX_FILE) as handle, pq.ParquetWriter(handle, INDEX_SCHEMA) as writer:
        for name, summary in units:
            for part in summary["parts"]:
                rows = pq.read_table(out_dir / SHARDS_DIR / name / f"{part['name']}.parquet")
                n = rows.num_rows
                rows = rows.append_column("shard", pa.array([f"{name}/{part['name']}"] * n, pa.string()))
                rows = rows.append_column("global_row", pa.array(np.arange(total, total + n), pa.int64()))
                writer.write_table(rows.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA))
                total += n
    bad_tables = []
    for name, summary in units:
        if summary.get("bad"):
            table = pq.read_table(out_dir / SHARDS_DIR / name / BAD_FILE)
            bad_tables.append(table.append_column("unit", pa.array([name] * table.num_rows, pa.string())))
            bad_total += table.num_rows
    bad_schema = BAD_SCHEMA.append(pa.field("unit", pa.string()))
    with atomic_open(out_dir / BAD_FILE) as handle:
        pq.write_table(pa.concat_tables(bad_tables) if bad_tables else bad_schema.empty_table(), handle)
    summary = {"rows": total, "bad": bad_total, "units": len(units), "features": job["features"],
               "dtype": job["dtype"], "format": job["format"], "embed_dim": job["embed_dim"],
               "seconds": sum(s.get("seconds", 0.0) for _, s in units), **(extra or {})}
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _safetensors_memmap(path: Path, name: str) -> np.ndarray:
    """Map one tensor of a safetensors file without reading it (its layout is a JSON header + raw bytes)."""
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    if name not in header:
        raise DataError(f"{path} has no tensor {name!r}")
    info = header[name]
    dtype = {"F16": np.float16, "F32": np.float32}[info["dtype"]]
    begin, _ = info["data_offsets"]
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=tuple(info["shape"]))


class FeatureStore:
    """Read access to a finished extraction output.

    Args:
        root: the ``--output`` folder of a completed ``dinoforge extract`` job.

    Raises:
        DataError: not an extraction output, or the job has not finished (no ``index.parquet``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        job = read_job(self.root)
        if job is None:
            raise DataError(f"{self.root} is not an extraction output (no {JOB_FILE})")
        if not (self.root / INDEX_FILE).is_file():
            raise DataError(f"extraction in {self.root} has not finished (no {INDEX_FILE}); rerun the same "
                            "extract command to complete it")
        self.job = job
        self._units = _unit_summaries(self.root, job)

    @property
    def features(self) -> list[str]:
        """Feature names stored (``cls``, ``mean``, ``cls+mean``, ``patch``)."""
        return list(self.job["features"])

    @property
    def num_rows(self) -> int:
        """Number of extracted inputs."""
        return sum(s["rows"] for _, s in self._units)

    @property
    def model_sha256(self) -> str | None:
        """Weights hash of the model the features came from."""
        return self.job.get("model_sha256")

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """``index.parquet``: id, path, label, source_index, content_hash, shard, row, global_row."""
        return pq.read_table(self.root / INDEX_FILE, columns=columns)

    def bad(self) -> pa.Table:
        """The skipped inputs: id, path, reason, unit."""
        return pq.read_table(self.root / BAD_FILE)

    def part_arrays(self, feature: str) -> list[np.ndarray]:
        """Read-only memory maps of ``feature``, one per part, in global row order."""
        if feature not in self.features:
            raise DataError(f"{self.root} holds features {self.features}, not {feature!r}")
        arrays = []
        for name, summary in self._units:
            for part in summary["parts"]:
                base = self.root / SHARDS_DIR / name / part["name"]
                if self.job["format"] == "npy":
                    arrays.append(np.load(f"{base}.{feature}.npy", mmap_mode="r"))
                else:
                    arrays.append(_safetensors_memmap(Path(f"{base}.safetensors"), feature))
        return arrays

    def vectors(self, feature: str = "cls") -> ShardedVectors:
        """A ``[num_rows, D]`` :class:`ShardedVectors` over the memory-mapped parts of a pooled feature."""
        if feature == "patch":
            raise DataError("patch tokens are [N, D] per image; use part_arrays('patch') instead of vectors()")
        arrays = self.part_arrays(feature)
        if not arrays:
            raise DataError(f"{self.root} holds no rows")
        return ShardedVectors(arrays)

    def load(self, feature: str = "cls") -> np.ndarray:
        """All rows of ``feature`` concatenated in memory (small outputs only)."""
        arrays = self.part_arrays(feature)
        return np.concatenate(arrays) if arrays else np.zeros((0, self.job["embed_dim"]), np.float32)
