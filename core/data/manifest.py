"""File manifests: txt (one path per line), CSV/TSV, parquet and Arrow with ``path`` and optional ``label``/``id``.

:func:`open_manifest` reads an Arrow IPC manifest (``.arrow``/``.feather``/``.ipc``) memory-mapped
(:mod:`~dinoforge.core.data.arrow_manifest`, for manifests of any size) and the other forms into pandas.

Extra columns are kept: a curation manifest adds its own columns (cluster, score, ...) and readers get them
in ``sample.meta`` and ``source.extra_columns``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dinoforge.core.data.arrow_manifest import ARROW_SUFFIXES, ArrowManifestSource, open_arrow_table
from dinoforge.core.data.base import IndexedSource
from dinoforge.core.data.sample import UNLABELLED, Record
from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import DEFAULT_MAX_PIXELS, decode_image

#: Manifest suffixes and the reader each one uses.
MANIFEST_SUFFIXES = {".txt": "txt", ".lst": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                     ".pq": "parquet", **{suffix: "arrow" for suffix in ARROW_SUFFIXES}}
_RESERVED = ("path", "label", "id")


def read_manifest_table(path: Path) -> pd.DataFrame:
    """Read a manifest file into a DataFrame with at least a ``path`` column (all ``path`` values as str).

    Raises:
        DataError: missing file, unknown suffix, unparsable content, or no ``path`` column.
    """
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"manifest {path}: unknown suffix {path.suffix!r}; use one of "
                        f"{', '.join(sorted(MANIFEST_SUFFIXES))}")
    try:
        if kind == "txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            table = pd.DataFrame({"path": [ln for ln in lines if ln and not ln.startswith("#")]}, dtype=object)
        elif kind == "parquet":
            table = pd.read_parquet(path)
        elif kind == "arrow":
            table = open_arrow_table(path).to_pandas()
        else:
            table = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype={"path": str, "id": str},
                                keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"manifest {path} is not a readable {kind} file: {err}") from err
    except Exception as err:  # pyarrow raises its own ArrowInvalid family for corrupt parquet files
        if type(err).__module__.startswith("pyarrow"):
            raise DataError(f"manifest {path} is not a readable parquet file: {err}") from err
        raise
    if "path" not in table.columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {list(table.columns)[:10]})")
    if table["path"].isna().any():
        row = int(np.flatnonzero(table["path"].isna().to_numpy())[0])
        raise DataError(f"manifest {path}: row {row} has an empty path")
    return table.reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _encode_labels(column: pd.Series, classes: Sequence[str] | None,
                   where: Path) -> tuple[np.ndarray, list[str] | None]:
    """Labels as ``int64`` (-1 = missing) plus class names (``None`` for plain integer labels)."""
    values = column.tolist()
    present = [v for v in values if not _is_missing(v)]
    as_int = [_as_int(v) for v in present]
    if classes is None and all(v is not None for v in as_int):
        return np.array([UNLABELLED if _is_missing(v) else _as_int(v) for v in values], dtype=np.int64), None
    names = list(classes) if classes is not None else sorted({str(v) for v in present})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in present} - index.keys())
    if unknown:
        raise DataError(f"manifest {where}: labels {unknown[:5]} are not among the given classes "
                        f"({len(names)} names)")
    return np.array([UNLABELLED if _is_missing(v) else index[str(v)] for v in values], dtype=np.int64), names


def _as_int(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


class ManifestSource(IndexedSource):
    """Images listed in a manifest file.

    Args:
        path: ``.txt``/``.lst``, ``.csv``, ``.tsv`` or ``.parquet``/``.pq``.
        root: base folder of relative paths (default: the manifest's folder).
        classes: fixed class names for string labels (e.g. the training manifest's).
        max_pixels: decompression-bomb guard passed to ``decode_image``.

    Attributes:
        table: the manifest as a DataFrame (every column, in file order).
        extra_columns: columns other than ``path``, ``label`` and ``id``; their values are in ``sample.meta``.

    Raises:
        DataError: missing/unreadable manifest, no ``path`` column, negative or unknown labels.
    """

    def __init__(self, path: str | Path, *, root: str | Path | None = None, classes: Sequence[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = Path(path).expanduser().resolve()
        self.spec = f"manifest:{self.path}"
        self.table = read_manifest_table(self.path)
        self.root = Path(root).expanduser().resolve() if root is not None else self.path.parent
        self.max_pixels = max_pixels
        self._rel = [str(p) for p in self.table["path"].tolist()]
        self._paths = [str(self.root / p) if not Path(p).is_absolute() else p for p in self._rel]
        self._ids = [str(i) for i in self.table["id"].tolist()] if "id" in self.table.columns else list(self._rel)
        self._label_array = np.full(len(self.table), UNLABELLED, dtype=np.int64)
        if "label" in self.table.columns:
            self._label_array, self.classes = _encode_labels(self.table["label"], classes, self.path)
            if (self._label_array < UNLABELLED).any():
                raise DataError(f"manifest {self.path}: labels must be non-negative integers or class names")
        self.extra_columns = [c for c in self.table.columns if c not in _RESERVED]
        self._extra = self.table[self.extra_columns].to_dict("records") if self.extra_columns else None

    def __len__(self) -> int:
        return len(self._paths)

    def record(self, index: int) -> Record:
        label = int(self._label_array[index])
        meta = self._extra[index] if self._extra is not None else {}
        return Record(id=self._ids[index], path=self._paths[index], label=None if label == UNLABELLED else label,
                      meta=meta)

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return decode_image(Path(self._paths[index]), max_pixels=self.max_pixels)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def labels(self) -> np.ndarray:
        return self._label_array.copy()


def open_manifest(path: str | Path, *, root: str | Path | None = None, classes: Sequence[str] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> IndexedSource:
    """The source of a manifest file: memory-mapped for Arrow IPC, :class:`ManifestSource` otherwise."""
    if Path(path).suffix.lower() in ARROW_SUFFIXES:
        return ArrowManifestSource(path, root=root, classes=classes, max_pixels=max_pixels)
    return ManifestSource(path, root=root, classes=classes, max_pixels=max_pixels)
