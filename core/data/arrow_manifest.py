"""Manifests at internet scale: an uncompressed Arrow IPC file, memory-mapped, never copied into Python lists.

A 142M-row manifest read by pandas costs ~40 GB in every rank. Read here, the file is mapped (its pages are
the OS page cache, shared by every process on the machine, and dropped under pressure); a record is sliced
out of the mapped columns when asked for, and only the class names of string labels are held in Python.

Write one with :func:`convert_manifest` or ``python -m dinoforge.core.data.arrow_manifest SRC DST`` (from a
CSV/TSV/parquet/txt manifest, streamed a record batch at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image

from dinoforge.core.data.base import IndexedSource
from dinoforge.core.data.sample import UNLABELLED, Record
from dinoforge.core.errors import DataError
from dinoforge.core.fileio import atomic_open
from dinoforge.core.preprocess import DEFAULT_MAX_PIXELS, decode_image

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
_RESERVED = ("path", "label", "id")
#: Schema metadata key where :func:`convert_manifest` records the checked labels (and class names).
LABELS_METADATA_KEY = b"dinoforge.labels"
#: Heap bytes that opening a mapped file may allocate (schema, footer); more means compressed buffers.
_MAX_OPEN_ALLOCATION = 16 << 20


def open_arrow_table(path: Path) -> pa.Table:
    """The table of an uncompressed Arrow IPC file, zero-copy over a memory map.

    Raises:
        DataError: missing or unreadable file, or compressed buffers (they would be decompressed into memory).
    """
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    before = pa.total_allocated_bytes()
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"manifest {path} is not a readable Arrow IPC file: {err}") from err
    if pa.total_allocated_bytes() - before > _MAX_OPEN_ALLOCATION:
        raise DataError(f"manifest {path} is a compressed Arrow file: it cannot be memory-mapped; rewrite it "
                        "uncompressed with `python -m dinoforge.core.data.arrow_manifest SRC DST`")
    return table


class _Column:
    """Random access into a chunked column without combining its chunks (which would copy them)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.chunks = column.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])[:-1]

    def __getitem__(self, index: int) -> Any:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.chunks[k][index - int(self.starts[k])].as_py()


class ColumnView(Sequence[str]):
    """A read-only ``Sequence[str]`` over a mapped string column (``source.ids`` of a huge manifest)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._column, self._n = _Column(column), len(column)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return str(self._column[index % self._n])

    def __iter__(self) -> Iterator[str]:
        for chunk in self._column.chunks:
            for start in range(0, len(chunk), 65536):
                yield from (str(v) for v in chunk.slice(start, 65536).to_pylist())


def _label_classes(column: pa.ChunkedArray, classes: Sequence[str] | None, where: Path,
                   known: dict[str, Any] | None = None) -> list[str] | None:
    """Class names for a string label column (``None`` for integer labels); checks integer labels' sign.

    ``known`` is what :func:`convert_manifest` recorded in the file (class names, labels checked): with it,
    opening reads no label page; without it, the label column is scanned once.
    """
    if pa.types.is_integer(column.type):
        low = None if known is not None else pc.min(column).as_py()
        if low is not None and low < 0:
            raise DataError(f"manifest {where}: labels must be non-negative integers or class names")
        return None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"manifest {where}: label column has type {column.type}; use integers or class names")
    if known is not None and "classes" in known:
        present = list(known["classes"])
    else:
        present = sorted(v for v in pc.unique(column).to_pylist() if v is not None)
    names = list(classes) if classes is not None else present
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise DataError(f"manifest {where}: labels {unknown[:5]} are not among the given classes "
                        f"({len(names)} names)")
    return names


def _known_labels(table: pa.Table) -> dict[str, Any] | None:
    raw = (table.schema.metadata or {}).get(LABELS_METADATA_KEY)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


class ArrowManifestSource(IndexedSource):
    """Images listed in a memory-mapped Arrow IPC manifest (``.arrow``/``.feather``/``.ipc``).

    Same columns and samples as :class:`~dinoforge.core.data.manifest.ManifestSource` (``path``, optional
    ``label`` and ``id``, extra columns in ``sample.meta``), with constant memory in the number of rows.

    Args:
        path: the manifest.
        root: base folder of relative paths (default: the manifest's folder).
        classes: fixed class names for string labels.
        max_pixels: decompression-bomb guard passed to ``decode_image``.

    Raises:
        DataError: missing/unreadable/compressed file, no ``path`` column, empty paths, bad labels.
    """

    def __init__(self, path: str | Path, *, root: str | Path | None = None, classes: Sequence[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = Path(path).expanduser().resolve()
        self.spec = f"manifest:{self.path}"
        self.table = open_arrow_table(self.path)
        names = self.table.column_names
        if "path" not in names:
            raise DataError(f"manifest {self.path} has no 'path' column (columns: {names[:10]})")
        if self.table.column("path").null_count:
            raise DataError(f"manifest {self.path}: some rows have an empty path")
        self.root = Path(root).expanduser().resolve() if root is not None else self.path.parent
        self.max_pixels = max_pixels
        self._paths = _Column(self.table.column("path"))
        self._ids = _Column(self.table.column("id")) if "id" in names else self._paths
        self._labels = _Column(self.table.column("label")) if "label" in names else None
        if "label" in names:
            self.classes = _label_classes(self.table.column("label"), classes, self.path, _known_labels(self.table))
        self._class_index = {c: i for i, c in enumerate(self.classes)} if self.classes is not None else None
        self.extra_columns = [c for c in names if c not in _RESERVED]
        self._extra = {c: _Column(self.table.column(c)) for c in self.extra_columns}

    def __len__(self) -> int:
        return self.table.num_rows

    def _label(self, index: int) -> int | None:
        value = self._labels[index] if self._labels is not None else None
        if value is None:
            return None
        return self._class_index[value] if self._class_index is not None else int(value)

    def _full_path(self, index: int) -> str:
        rel = str(self._paths[index])
        return rel if Path(rel).is_absolute() else str(self.root / rel)

    def record(self, index: int) -> Record:
        index = self._check_index(index)
        meta = {c: col[index] for c, col in self._extra.items()}
        return Record(id=str(self._ids[index]), path=self._full_path(index), label=self._label(index), meta=meta)

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return decode_image(Path(self._full_path(index)), max_pixels=self.max_pixels)

    @property
    def ids(self) -> ColumnView:  # type: ignore[override]  # a lazy view, not a list of 142M strings
        """Sample ids in order, as a lazy read-only sequence."""
        return ColumnView(self.table.column("id" if "id" in self.table.column_names else "path"))

    @property
    def labels(self) -> np.ndarray:
        """``int64 [N]`` labels (-1 = none); 8 bytes a row, built only when asked for."""
        if self._labels is None:
            return np.full(len(self), UNLABELLED, dtype=np.int64)
        column = self.table.column("label")
        if self._class_index is not None:
            column = pc.index_in(column, value_set=pa.array(self.classes, column.type))
        return column.fill_null(UNLABELLED).to_numpy().astype(np.int64)


def _read_batches(src: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a txt/CSV/TSV/parquet manifest, streamed (never the whole file in memory)."""
    suffix = src.suffix.lower()
    if suffix in (".parquet", ".pq"):
        yield from pq.ParquetFile(src).iter_batches(batch_size=batch_rows)
    elif suffix in (".csv", ".tsv"):
        parse = pa_csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        convert = pa_csv.ConvertOptions(column_types={"path": pa.string(), "id": pa.string()},
                                        strings_can_be_null=True)
        yield from pa_csv.open_csv(src, parse_options=parse, convert_options=convert,
                                   read_options=pa_csv.ReadOptions(block_size=64 << 20))
    elif suffix in (".txt", ".lst"):
        with src.open(encoding="utf-8") as handle:
            lines: list[str] = []
            for line in handle:
                if (line := line.strip()) and not line.startswith("#"):
                    lines.append(line)
                if len(lines) == batch_rows:
                    yield pa.record_batch({"path": pa.array(lines, pa.string())})
                    lines = []
            if lines:
                yield pa.record_batch({"path": pa.array(lines, pa.string())})
    else:
        raise DataError(f"cannot convert {src}: unknown manifest suffix {src.suffix!r}")


def _scan_labels(src: Path, batch_rows: int) -> dict[str, Any]:
    """First pass of a conversion: check the labels, collect class names (what the reader would scan for)."""
    classes: set[str] = set()
    integer = True
    for batch in _read_batches(src, batch_rows):
        if "label" not in batch.schema.names:
            return {}
        column = batch.column("label")
        if pa.types.is_integer(column.type):
            low = pc.min(column).as_py()
            if low is not None and low < 0:
                raise DataError(f"manifest {src}: labels must be non-negative integers or class names")
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            integer = False
            classes.update(v for v in pc.unique(column).to_pylist() if v is not None)
        elif column.null_count < len(column):
            raise DataError(f"manifest {src}: label column has type {column.type}; use integers or class names")
    return {"checked": True} if integer else {"checked": True, "classes": sorted(classes)}


def convert_manifest(src: str | Path, dst: str | Path, *, batch_rows: int = 1 << 20) -> int:
    """Rewrite a manifest as an uncompressed Arrow IPC file (atomically); returns the row count.

    Labels are checked here and the class names recorded in the file, so that opening it reads no label page.

    Raises:
        DataError: unreadable source, no ``path`` column, bad labels, or a destination that is not Arrow.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() not in ARROW_SUFFIXES:
        raise DataError(f"{dst}: an Arrow manifest is named *{' or *'.join(ARROW_SUFFIXES)}")
    if not src.is_file():
        raise DataError(f"manifest {src} does not exist")
    rows, writer = 0, None
    try:
        labels = _scan_labels(src, batch_rows)
        with atomic_open(str(dst), "wb") as handle:
            for batch in _read_batches(src, batch_rows):
                if "path" not in batch.schema.names:
                    raise DataError(f"manifest {src} has no 'path' column (columns: {batch.schema.names[:10]})")
                if writer is None:
                    meta = {LABELS_METADATA_KEY: json.dumps(labels).encode()} if labels else {}
                    writer = pa.ipc.new_file(handle, batch.schema.with_metadata(meta))
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is None:
                raise DataError(f"manifest {src} holds no rows")
            writer.close()
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise DataError(f"manifest {src} could not be converted: {err}") from err
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dinoforge.core.data.arrow_manifest SRC DST``: convert a manifest to memory-mappable Arrow."""
    parser = argparse.ArgumentParser(prog="python -m dinoforge.core.data.arrow_manifest", description=main.__doc__)
    parser.add_argument("src", help="txt/csv/tsv/parquet manifest")
    parser.add_argument("dst", help="output .arrow file")
    parser.add_argument("--batch-rows", type=int, default=1 << 20, help="rows per record batch")
    args = parser.parse_args(argv)
    try:
        rows = convert_manifest(args.src, args.dst, batch_rows=args.batch_rows)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {rows} rows to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
