"""Deterministic views on sources: subsets, permutations, stratified samples, hold-out splits, concatenation.

Every helper is a pure function of the source order and a seed (``numpy.random.default_rng(seed)``), so the
same call always selects the same samples on any machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import get_worker_info

from dinoforge.core.data.base import DataSource, IndexedSource, SampleOrBad, StreamingSource, SubsetSource
from dinoforge.core.data.sample import UNLABELLED, Record
from dinoforge.core.errors import DataError


class ConcatSource(IndexedSource):
    """Several indexed sources one after the other; ``classes`` kept only when every part has the same."""

    def __init__(self, parts: Sequence[IndexedSource]) -> None:
        if not parts:
            raise DataError("ConcatSource needs at least one source")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        first = self.parts[0].classes
        self.classes = first if all(p.classes == first for p in self.parts) else None
        self.spec = "+".join(p.spec for p in self.parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[IndexedSource, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part], index - int(self.offsets[part])

    def record(self, index: int) -> Record:
        part, local = self._locate(index)
        rec = part.record(local)
        if self.classes is None and part.classes is not None and rec.label is not None:
            # Class indices of differently-named parts would collide: keep the name, drop the index.
            return Record(rec.id, rec.path, None, {**rec.meta, "class_name": part.classes[rec.label]})
        return rec

    def _load_image(self, index: int, record: Record) -> Image.Image:
        part, local = self._locate(index)
        return part._load_image(local, record)


class TakeSource(StreamingSource):
    """Samples ``start:stop`` of a stream (single-process iteration only: workers would each take a slice)."""

    def __init__(self, parent: StreamingSource, start: int, stop: int | None, *, spec: str | None = None) -> None:
        if start < 0 or (stop is not None and stop < start):
            raise DataError(f"slice [{start}:{stop}] of the stream {parent.spec} must be increasing and "
                            "non-negative")
        self.parent, self.start, self.stop = parent, start, stop
        self.classes = parent.classes
        self.spec = spec or f"{parent.spec}[{start}:{'' if stop is None else stop}]"

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.parent.set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleOrBad]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise DataError(f"{self.spec}: a slice of a streaming source needs num_workers=0 or 1 "
                            f"(got {info.num_workers} workers)")
        yield from itertools.islice(iter(self.parent), self.start, self.stop)


def _indexed(source: DataSource, what: str) -> IndexedSource:
    if not isinstance(source, IndexedSource):
        raise DataError(f"{what} needs an indexed source (folder, manifest, fmnist); {source.spec} is a stream")
    return source


def random_subset(source: DataSource, n: int, seed: int = 0) -> IndexedSource:
    """``n`` samples drawn without replacement, kept in source order."""
    src = _indexed(source, "a random subset")
    if not 0 < n <= len(src):
        raise DataError(f"cannot draw {n} samples from {src.spec} ({len(src)} samples)")
    idx = np.sort(np.random.default_rng(seed).choice(len(src), size=n, replace=False))
    return SubsetSource(src, idx, spec=f"{src.spec}[~{n}@{seed}]")


def repeated(source: DataSource, times: int) -> IndexedSource:
    """Every sample ``times`` times, in source order (weighs a small source up when joined with a large one)."""
    src = _indexed(source, "repetition")
    if times <= 0:
        raise DataError(f"cannot repeat {src.spec} {times} times (give a positive count)")
    return SubsetSource(src, np.tile(np.arange(len(src)), times), spec=f"{src.spec}[*{times}]")


def shuffled(source: DataSource, seed: int = 0) -> IndexedSource:
    """All samples in a seeded random order."""
    src = _indexed(source, "shuffling")
    return SubsetSource(src, np.random.default_rng(seed).permutation(len(src)), spec=f"{src.spec}[shuffled@{seed}]")


def stratified_subset(source: DataSource, per_class: int, seed: int = 0) -> IndexedSource:
    """``per_class`` samples of every class (all of a class when it has fewer), in source order."""
    src = _indexed(source, "a stratified subset")
    labels = src.labels
    if (labels == UNLABELLED).all():
        raise DataError(f"a stratified subset needs labels; {src.spec} is unlabelled")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels[labels != UNLABELLED]):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return SubsetSource(src, np.sort(np.concatenate(picked)), spec=f"{src.spec}[{per_class}/class@{seed}]")


def holdout_split(source: DataSource, fraction: float = 0.1, seed: int = 0) -> tuple[IndexedSource, IndexedSource]:
    """``(rest, held_out)``: a seeded random ``fraction`` held out, both parts in source order."""
    src = _indexed(source, "a hold-out split")
    if not 0.0 < fraction < 1.0:
        raise DataError(f"hold-out fraction must be in (0, 1), got {fraction}")
    n_out = max(1, round(len(src) * fraction))
    if n_out >= len(src):
        raise DataError(f"{src.spec} has {len(src)} samples: too few to hold out {fraction:.0%}")
    perm = np.random.default_rng(seed).permutation(len(src))
    held, rest = np.sort(perm[:n_out]), np.sort(perm[n_out:])
    return (SubsetSource(src, rest, spec=f"{src.spec}[rest@{seed}]"),
            SubsetSource(src, held, spec=f"{src.spec}[holdout@{seed}]"))


def slice_source(source: DataSource, start: int | None, stop: int | None) -> DataSource:
    """Samples ``start:stop`` in source order (Python slice semantics for indexed sources)."""
    tag = f"[{'' if start is None else start}:{'' if stop is None else stop}]"
    if isinstance(source, IndexedSource):
        return SubsetSource(source, np.arange(len(source))[slice(start, stop)], spec=source.spec + tag)
    if isinstance(source, StreamingSource):
        return TakeSource(source, start or 0, stop, spec=source.spec + tag)
    raise DataError(f"cannot slice {source!r}")
