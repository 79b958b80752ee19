"""Spec strings: one string per source for configs and command lines.

``SCHEME:TARGET[SELECTION]`` with schemes ``folder``, ``manifest``, ``wds``, ``fmnist``, ``photos`` (a collection
built by ``dinoforge photos``), ``tuxpaint`` (``eval`` / ``other`` stamps); without a scheme the kind is inferred
from the path. Selections: ``[a:b]`` slices, ``[~N]`` / ``[~N@SEED]`` random subsets, ``[*N]`` every sample N
times (weighs a small source up in a join). Indexed sources join with ``+`` before a scheme:
``photos:runs/photos[*10]+fmnist:train[~10000@0]`` is the first, then the second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoforge.core.data.base import DataSource, IndexedSource
from dinoforge.core.data.fmnist import FashionMNISTSource
from dinoforge.core.data.folder import ImageFolderSource
from dinoforge.core.data.manifest import MANIFEST_SUFFIXES, open_manifest
from dinoforge.core.data.photos import open_photos
from dinoforge.core.data.subset import ConcatSource, random_subset, repeated, slice_source
from dinoforge.core.data.tuxpaint import TuxpaintSource
from dinoforge.core.data.webdataset import WebDatasetSource
from dinoforge.core.errors import DataError

SCHEMES = ("folder", "manifest", "wds", "fmnist", "photos", "tuxpaint")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+-]*):(?!//)")
_SELECTION = re.compile(r"\[([^\[\]]*)\]$")
_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")
_RANDOM = re.compile(r"^\s*~\s*(\d+)\s*(?:@\s*(\d+))?\s*$")
_REPEAT = re.compile(r"^\s*\*\s*(\d+)\s*$")
_JOIN = re.compile(r"\+(?=(?:" + "|".join(SCHEMES) + r"):)")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed spec string."""

    scheme: str
    target: str
    selection: str | None = None

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}" + (f"[{self.selection}]" if self.selection is not None else "")


def _infer_scheme(target: str) -> str:
    path = Path(target).expanduser()
    if path.is_dir():
        return "folder"
    suffixes = "".join(path.suffixes).lower()
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if suffixes.endswith((".tar", ".tar.gz", ".tgz")) or "{" in target:
        return "wds"
    raise DataError(f"cannot tell what kind of data source {target!r} is (not a folder, a manifest "
                    f"({', '.join(sorted(MANIFEST_SUFFIXES))}) or .tar shards); write it as "
                    f"{' | '.join(s + ':...' for s in SCHEMES)}")


def parse_spec(spec: str) -> SourceSpec:
    """Split a spec string into scheme, target and selection (the target is not checked here).

    Raises:
        DataError: empty spec or unknown scheme.
    """
    text = str(spec).strip()
    if not text:
        raise DataError("empty data source spec")
    selection = None
    match = _SELECTION.search(text)
    if match is not None:
        selection, text = match.group(1), text[:match.start()]
    scheme_match = _SCHEME.match(text)
    if scheme_match is not None:
        scheme, target = scheme_match.group(1).lower(), text[scheme_match.end():]
        if scheme not in SCHEMES:
            raise DataError(f"unknown data source scheme {scheme!r} in {spec!r}; known: "
                            f"{', '.join(s + ':' for s in SCHEMES)}")
    else:
        scheme, target = _infer_scheme(text), text
    if not target:
        raise DataError(f"data source spec {spec!r} names no {scheme} target")
    return SourceSpec(scheme, target, selection)


def _select(source: DataSource, selection: str, spec: str) -> DataSource:
    if (m := _SLICE.match(selection)) is not None:
        start, stop = (int(g) if g else None for g in m.groups())
        return slice_source(source, start, stop)
    if (m := _RANDOM.match(selection)) is not None:
        return random_subset(source, int(m.group(1)), int(m.group(2) or 0))
    if (m := _REPEAT.match(selection)) is not None:
        return repeated(source, int(m.group(1)))
    raise DataError(f"bad selection [{selection}] in {spec!r}; use [start:stop], [~N], [~N@SEED] or [*N]")


def open_source(spec: str | Path | DataSource, *, classes: Sequence[str] | None = None,
                **options: Any) -> DataSource:
    """Open a data source from its spec string (a :class:`DataSource` is returned as is).

    Args:
        spec: ``folder:/d``, ``manifest:/m.csv``, ``wds:/s-{0..9}.tar``, ``fmnist:train``, a bare path, each
            optionally followed by a selection.
        classes: fixed class-name order (e.g. the training source's) for folder, manifest and wds sources;
            for Fashion-MNIST it must equal its own names.
        **options: passed to the source constructor (``root=`` for manifests and Fashion-MNIST,
            ``shuffle=``/``seed=``/``rank=``/``world_size=`` for wds, ``labels=`` for folders, ...).

    Raises:
        DataError: unknown scheme, missing data, or invalid selection/options.
    """
    if isinstance(spec, DataSource):
        return spec
    parts = _JOIN.split(str(spec))
    if len(parts) > 1:
        return _join([open_source(part, classes=classes, **options) for part in parts], str(spec))
    parsed = parse_spec(str(spec))
    try:
        source = _construct(parsed, classes, options)
    except TypeError as err:
        raise DataError(f"invalid option for a {parsed.scheme} source: {err}") from err
    if parsed.selection is not None:
        source = _select(source, parsed.selection, str(spec))
    return source


def _join(sources: list[DataSource], spec: str) -> DataSource:
    indexed = [s for s in sources if isinstance(s, IndexedSource)]
    if len(indexed) != len(sources):
        raise DataError(f"{spec!r}: only indexed sources (not wds streams) can be joined with '+'")
    return ConcatSource(indexed)


def _construct(parsed: SourceSpec, classes: Sequence[str] | None, options: dict[str, Any]) -> DataSource:
    if parsed.scheme == "folder":
        return ImageFolderSource(parsed.target, classes=classes, **options)
    if parsed.scheme == "manifest":
        return open_manifest(parsed.target, classes=classes, **options)
    if parsed.scheme == "wds":
        return WebDatasetSource(parsed.target, classes=classes, **options)
    if parsed.scheme == "photos":
        return open_photos(parsed.target, classes=classes, **options)
    if parsed.scheme == "tuxpaint":
        return TuxpaintSource(parsed.target, **options)
    source = FashionMNISTSource(parsed.target, **options)
    if classes is not None and list(classes) != source.classes:
        raise DataError(f"fmnist:{parsed.target} has the fixed Fashion-MNIST classes; it cannot be mapped onto "
                        f"{list(classes)[:5]}...")
    return source
