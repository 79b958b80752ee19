"""Writing one work unit of an extraction job: feature parts, their row tables, and the unit's bad list.

A unit directory is built under a temporary name and renamed into place when complete
(:func:`dinoforge.core.fileio.atomic_directory`), so after a crash a unit is either entirely there or absent —
the property resumption relies on. Inside it::

    part-000.cls.npy      float16/float32 [rows, D]        (npy format: one file per feature)
    part-000.patch.npy    [rows, N, D]
    part-000.safetensors  all features of the part          (safetensors format instead)
    part-000.parquet      id, path, label, source_index, content_hash, row  (row = position in the part)
    bad.parquet           id, path, reason                 (only when some inputs were skipped)
    unit.json             rows, parts, bad count, seconds

``.npy`` parts are streamed to disk row block by row block (:class:`NpyAppender`), so a part never has to
fit in memory; safetensors parts are assembled in memory (choose ``shard_size`` accordingly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file

ROW_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.int64()),
                        ("source_index", pa.int64()), ("content_hash", pa.string()), ("row", pa.int64())])
BAD_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
UNIT_FILE = "unit.json"


def part_name(index: int) -> str:
    """``part-007`` for part 7 of a unit."""
    return f"part-{index:03d}"


class NpyAppender:
    """An ``.npy`` file written incrementally: rows are appended, the header is fixed up on close.

    The header is written once for ``max_rows`` and padded; on close it is rewritten for the rows actually
    written (never longer, since the row count only shrinks), so the result is a standard ``.npy`` file that
    ``np.load(..., mmap_mode="r")`` maps.

    Args:
        path: file to create.
        row_shape: shape of one row (``(D,)`` or ``(N, D)``).
        dtype: numpy dtype of the file.
        max_rows: upper bound on the rows that will be appended.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype, max_rows: int) -> None:
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self.max_rows = max_rows
        self._header_len = len(self._header(max_rows))
        self._fh: BinaryIO = open(path, "wb")  # closed in close()
        self._fh.write(self._header(max_rows))

    def _header(self, rows: int, pad_to: int | None = None) -> bytes:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = repr({"descr": descr, "fortran_order": False, "shape": (rows, *self.row_shape)})
        # Magic (6) + version (2) + length (2) + dict + newline, total a multiple of 64 (numpy's alignment).
        total = pad_to or ((10 + len(text) + 1 + 16 + 63) // 64) * 64  # 16 spare bytes for longer row counts
        body = text + " " * (total - 10 - len(text) - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")

    def append(self, rows: np.ndarray) -> None:
        """Append ``[m, *row_shape]`` rows (cast to the file dtype)."""
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} do not match {self.row_shape}")
        if self.rows + rows.shape[0] > self.max_rows:
            raise ValueError(f"more than max_rows={self.max_rows} rows appended to {self.path}")
        self._fh.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        """Rewrite the header for the final row count, flush and fsync."""
        self._fh.seek(0)
        self._fh.write(self._header(self.rows, pad_to=self._header_len))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


class PartWriter:
    """Rows of one part: features in npy appenders (or memory, for safetensors) plus the row table."""

    def __init__(self, directory: Path, index: int, *, fmt: str, dtype: np.dtype, max_rows: int) -> None:
        self.directory, self.name, self.fmt = directory, part_name(index), fmt
        self.dtype, self.max_rows = np.dtype(dtype), max_rows
        self.appenders: dict[str, NpyAppender] = {}
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.records: dict[str, list[Any]] = {"id": [], "path": [], "label": [], "source_index": [],
                                              "content_hash": []}

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return len(self.records["id"])

    def append(self, features: dict[str, np.ndarray], records: dict[str, list[Any]]) -> None:
        """Add ``m`` rows: ``features[name]`` is ``[m, ...]``; ``records`` maps row-table columns to m values."""
        for name, value in features.items():
            if self.fmt == "npy":
                if name not in self.appenders:
                    file = self.directory / f"{self.name}.{name}.npy"
                    self.appenders[name] = NpyAppender(file, value.shape[1:], self.dtype, self.max_rows)
                self.appenders[name].append(value)
            else:
                self.buffers.setdefault(name, []).append(np.ascontiguousarray(value, dtype=self.dtype))
        for column, values in self.records.items():
            values.extend(records[column])

    def close(self) -> dict[str, Any]:
        """Finish the feature files and write the row table; returns ``{"name", "rows"}``."""
        for appender in self.appenders.values():
            appender.close()
        if self.fmt == "safetensors" and self.buffers:
            tensors = {name: np.concatenate(chunks) for name, chunks in self.buffers.items()}
            save_file(tensors, str(self.directory / f"{self.name}.safetensors"))
        table = pa.table({**self.records, "row": np.arange(self.rows, dtype=np.int64)}, schema=ROW_SCHEMA)
        pq.write_table(table, self.directory / f"{self.name}.parquet")
        return {"name": self.name, "rows": self.rows}


class UnitWriter:
    """Accumulates a unit's rows into parts of at most ``part_rows`` rows inside a staging directory.

    Args:
        staging: the unit's temporary directory (from :func:`atomic_directory`).
        part_rows: rows per part (the job's ``shard_size``).
        fmt: ``npy`` or ``safetensors``.
        dtype: feature dtype on disk.
    """

    def __init__(self, staging: Path, *, part_rows: int, fmt: str, dtype: np.dtype) -> None:
        self.staging, self.part_rows, self.fmt, self.dtype = staging, part_rows, fmt, dtype
        self.parts: list[dict[str, Any]] = []
        self.current: PartWriter | None = None
        self.bad: list[dict[str, str | None]] = []

    def append(self, features: dict[str, np.ndarray], records: dict[str, list[Any]]) -> None:
        """Add rows (``records``: row-table column -> values), starting a new part when the current one is full."""
        start = 0
        total = len(records["id"])
        while start < total:
            if self.current is None or self.current.rows >= self.part_rows:
                self._close_part()
                self.current = PartWriter(self.staging, len(self.parts), fmt=self.fmt, dtype=self.dtype,
                                          max_rows=self.part_rows)
            take = min(total - start, self.part_rows - self.current.rows)
            stop = start + take
            self.current.append({k: v[start:stop] for k, v in features.items()},
                                {k: v[start:stop] for k, v in records.items()})
            start = stop

    def add_bad(self, sample_id: str, path: str | None, reason: str) -> None:
        """List an input that was skipped."""
        self.bad.append({"id": sample_id, "path": path, "reason": reason})

    def _close_part(self) -> None:
        if self.current is not None and self.current.rows:
            self.parts.append(self.current.close())
        self.current = None

    def close(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Finish the last part, write ``bad.parquet`` and ``unit.json``; returns the unit summary."""
        self._close_part()
        if self.bad:
            pq.write_table(pa.Table.from_pylist(self.bad, schema=BAD_SCHEMA), self.staging / "bad.parquet")
        summary = {"parts": self.parts, "rows": sum(p["rows"] for p in self.parts), "bad": len(self.bad), **extra}
        (self.staging / UNIT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
