"""The two kinds of data source: indexed (random access, a ``Dataset``) and streaming (an ``IterableDataset``).

Sources never raise for a bad file once opened: reading an unreadable, corrupt or missing image returns a
:class:`~dinoforge.core.data.sample.BadSample` instead, so a long job skips it and goes on. Opening a source
(missing folder, unreadable manifest, missing shard) does raise :class:`~dinoforge.core.errors.DataError`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from dinoforge.core.data.sample import UNLABELLED, BadSample, Record, Sample
from dinoforge.core.errors import DataError, ImageDecodeError

SampleOrBad = Sample | BadSample


class DataSource(abc.ABC):
    """Common surface of every source.

    Attributes:
        spec: the spec string that reopens this source (``folder:/data``, ``fmnist:test[:100]``).
        classes: class names, class ``i`` being ``classes[i]``; ``None`` when unlabelled or when the labels
            are plain integers without names.
    """

    spec: str = ""
    classes: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        """Number of named classes (``None`` when the source has no class names)."""
        return None if self.classes is None else len(self.classes)

    @abc.abstractmethod
    def __iter__(self) -> Iterator[SampleOrBad]:
        """Yield every sample (or a bad-sample record) in the source's order."""

    def describe(self) -> str:
        """One line for logs and reports."""
        size = f"{len(self)} samples" if isinstance(self, IndexedSource) else "streaming"
        classes = f", {len(self.classes)} classes" if self.classes else ""
        return f"{self.spec} ({size}{classes})"


class IndexedSource(DataSource, Dataset):
    """A source with random access; ``source[i]`` decodes sample ``i``.

    Subclasses implement :meth:`__len__`, :meth:`record` and :meth:`_load_image`.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of entries (bad files included: they are only found when read)."""

    @abc.abstractmethod
    def record(self, index: int) -> Record:
        """Entry ``index`` without decoding its image."""

    @abc.abstractmethod
    def _load_image(self, index: int, record: Record) -> Image.Image:
        """Decode entry ``index``; raise :class:`ImageDecodeError` for anything unreadable."""

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.spec} ({n} samples)")
        return index % n

    def __getitem__(self, index: int) -> SampleOrBad:
        index = self._check_index(int(index))
        rec = self.record(index)
        try:
            image = self._load_image(index, rec)
        except ImageDecodeError as err:
            return BadSample(id=rec.id, path=rec.path, reason=str(err))
        return Sample(id=rec.id, image=image, label=rec.label, path=rec.path, meta=dict(rec.meta))

    def __iter__(self) -> Iterator[SampleOrBad]:
        for i in range(len(self)):
            yield self[i]

    @property
    def ids(self) -> list[str]:
        """Sample ids in order."""
        return [self.record(i).id for i in range(len(self))]

    @property
    def labels(self) -> np.ndarray:
        """``int64 [N]`` labels in order, :data:`UNLABELLED` (-1) where there is none."""
        return np.array([UNLABELLED if (lab := self.record(i).label) is None else lab for i in range(len(self))],
                        dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, *, spec: str | None = None) -> IndexedSource:
        """A view on the given entries, in the given order."""
        return SubsetSource(self, indices, spec=spec)


class StreamingSource(DataSource, IterableDataset):
    """A source read front to back (e.g. tar shards); split over ranks and DataLoader workers by itself."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling order the next pass uses."""
        self.epoch = int(epoch)

    def state(self) -> dict[str, Any]:
        """What identifies a pass (for logs)."""
        return {"spec": self.spec, "epoch": self.epoch}


class SubsetSource(IndexedSource):
    """Entries ``indices`` of ``parent``, in that order (ids, labels and classes are the parent's)."""

    def __init__(self, parent: IndexedSource, indices: Sequence[int] | np.ndarray, *, spec: str | None = None) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(parent)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise DataError(f"subset indices out of range for {parent.spec} ({n} samples)")
        self.parent, self.indices = parent, idx % n if n else idx
        self.classes = parent.classes
        self.spec = spec or f"{parent.spec}[subset of {len(idx)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, index: int) -> Record:
        return self.parent.record(int(self.indices[index]))

    def _load_image(self, index: int, record: Record) -> Image.Image:
        return self.parent._load_image(int(self.indices[index]), record)

    @property
    def ids(self) -> list[str]:
        ids = self.parent.ids
        return [ids[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self.parent.labels[self.indices]
