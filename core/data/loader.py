"""Batched loading that survives bad files, also inside DataLoader worker processes.

A worker turns an unreadable file into a :class:`BadSample`; the collate function sets such records aside and
returns them with the batch; the main-process :class:`SkippingLoader` counts, logs and lists them. Batches whose
samples are all bad are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar, cast

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from dinoforge.core.data.base import DataSource, IndexedSource, StreamingSource
from dinoforge.core.data.sample import UNLABELLED, BadSample, Sample
from dinoforge.core.errors import DataError, ImageDecodeError
from dinoforge.core.preprocess import PreprocessConfig, preprocess_image

log = logging.getLogger("dinoforge.data")
T = TypeVar("T")
MAX_LISTED = 1000
WARN_INDIVIDUALLY = 20


@dataclass
class SkipStats:
    """What a pass over a source skipped.

    Attributes:
        seen: samples read, good and bad.
        bad: samples skipped.
        bad_samples: the first :data:`MAX_LISTED` skipped samples.
    """

    seen: int = 0
    bad: int = 0
    bad_samples: list[BadSample] = field(default_factory=list)

    @property
    def good(self) -> int:
        """Samples delivered."""
        return self.seen - self.bad

    def add_good(self, n: int = 1) -> None:
        """Count ``n`` delivered samples."""
        self.seen += n

    def add_bad(self, bad: BadSample, *, where: str = "") -> None:
        """Count, log (the first few individually) and list one skipped sample."""
        self.seen += 1
        self.bad += 1
        if len(self.bad_samples) < MAX_LISTED:
            self.bad_samples.append(bad)
        if self.bad <= WARN_INDIVIDUALLY:
            log.warning("skipped unreadable sample %s%s", bad, f" in {where}" if where else "")

    def summary(self) -> str:
        """One line: ``skipped 3 of 1000 samples (first: a.jpg: not a decodable image ...)``."""
        if not self.bad:
            return f"read {self.seen} samples, none skipped"
        return f"skipped {self.bad} of {self.seen} samples (first: {self.bad_samples[0]})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts and the listed bad samples."""
        return {"seen": self.seen, "good": self.good, "bad": self.bad,
                "bad_samples": [{"id": b.id, "path": b.path, "reason": b.reason} for b in self.bad_samples]}


class _MappedIndexed(Dataset):
    def __init__(self, source: IndexedSource, fn: Callable[[Sample], Any]) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        return _apply(self.fn, self.source[index])


class _MappedStream(IterableDataset):
    def __init__(self, source: StreamingSource, fn: Callable[[Sample], Any]) -> None:
        self.source, self.fn = source, fn

    def __iter__(self) -> Iterator[Any]:
        return (_apply(self.fn, s) for s in self.source)


def _apply(fn: Callable[[Sample], Any], sample: Sample | BadSample) -> Any:
    if isinstance(sample, BadSample):
        return sample
    try:
        return fn(sample)
    except ImageDecodeError as err:
        return BadSample(sample.id, sample.path, str(err))


def map_source(source: DataSource, fn: Callable[[Sample], Any]) -> Dataset:
    """A torch dataset applying ``fn(sample)`` in the workers; bad samples pass through as records.

    ``fn`` must be picklable for spawn-started workers (a module-level function or a class instance).
    """
    if isinstance(source, IndexedSource):
        return _MappedIndexed(source, fn)
    if isinstance(source, StreamingSource):
        return _MappedStream(source, fn)
    raise DataError(f"cannot load from {source!r}: not a DataSource")


class _SkipCollate:
    """Collate the good items with ``inner``; return ``(batch or None, bad records, n_good)``."""

    def __init__(self, inner: Callable[[list[Any]], Any]) -> None:
        self.inner = inner

    def __call__(self, items: list[Any]) -> tuple[Any, list[BadSample], int]:
        good = [x for x in items if not isinstance(x, BadSample)]
        bad = [x for x in items if isinstance(x, BadSample)]
        return (self.inner(good) if good else None), bad, len(good)


def _worker_init(_: int) -> None:
    # Each worker decodes and resizes one sample at a time: extra intra-op threads only oversubscribe the CPU.
    torch.set_num_threads(1)


class SkippingLoader(Generic[T]):
    """A ``torch.utils.data.DataLoader`` that drops, counts and lists bad samples.

    Args:
        dataset: a dataset whose items may be :class:`BadSample` (see :func:`map_source`).
        collate_fn: collates a list of good items into a batch of type ``T``.
        batch_size, num_workers, drop_last, pin_memory, persistent_workers, prefetch_factor: as DataLoader.
        shuffle: random order for indexed datasets, seeded by ``seed + epoch``.
        seed: shuffling seed.
        description: names the data in warnings.
    """

    def __init__(self, dataset: Dataset, *, collate_fn: Callable[[list[Any]], T] = default_collate,
                 batch_size: int = 64, num_workers: int = 0, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int | None = None, description: str = "") -> None:
        if batch_size <= 0 or num_workers < 0:
            raise DataError(f"batch_size must be positive and num_workers non-negative "
                            f"(got {batch_size}, {num_workers})")
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.shuffle = shuffle and not isinstance(dataset, IterableDataset)
        self.description = description
        self.stats = SkipStats()
        self._generator = torch.Generator()
        self._loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=self.shuffle, num_workers=num_workers,
            collate_fn=_SkipCollate(collate_fn), drop_last=drop_last, pin_memory=pin_memory,
            worker_init_fn=_worker_init if num_workers else None, generator=self._generator,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers else None)

    @property
    def num_samples(self) -> int | None:
        """Entries of an indexed dataset (bad ones included), ``None`` for streams."""
        if isinstance(self.dataset, IterableDataset):
            return None
        return len(cast(Sized, self.dataset))  # a map-style dataset has __len__; torch's Dataset does not declare it

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling for ``epoch`` (streaming sources: forwarded to the source)."""
        self.epoch = int(epoch)
        source = getattr(self.dataset, "source", None)
        if isinstance(source, StreamingSource):
            source.set_epoch(epoch)

    def __iter__(self) -> Iterator[T]:
        self._generator.manual_seed(self.seed + self.epoch)
        before = self.stats.bad
        for batch, bad, n_good in self._loader:
            for record in bad:
                self.stats.add_bad(record, where=self.description)
            self.stats.add_good(n_good)
            if batch is not None:
                yield batch
        if self.stats.bad > before:
            log.warning("%s: %s", self.description or "data", self.stats.summary())


class ImageBatch(NamedTuple):
    """A batch of preprocessed images: ``pixels [B, 3, H, W]`` float32, ``labels [B]`` int64 (-1 = none)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    ids: list[str]


class Preprocess:
    """Picklable ``Sample -> (pixels [3, H, W], label, id)`` applying a contract or an image transform."""

    def __init__(self, transform: PreprocessConfig | Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, int, str]:
        if isinstance(self.transform, PreprocessConfig):
            pixels = preprocess_image(sample.image, self.transform)
        else:
            pixels = self.transform(sample.image)
        return pixels, UNLABELLED if sample.label is None else sample.label, sample.id


def collate_images(items: list[tuple[torch.Tensor, int, str]]) -> ImageBatch:
    """Stack ``(pixels, label, id)`` items; different image sizes are a :class:`DataError`."""
    shapes = {tuple(x[0].shape) for x in items}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes after preprocessing {sorted(shapes)[:3]}: they cannot "
                        "share a batch (patch_multiple mode keeps aspect); use batch_size=1 or a fixed-size mode")
    return ImageBatch(torch.stack([x[0] for x in items]), torch.tensor([x[1] for x in items], dtype=torch.int64),
                      [x[2] for x in items])


def image_batches(source: DataSource, transform: PreprocessConfig | Callable[[Image.Image], torch.Tensor], *,
                  batch_size: int = 64, num_workers: int = 0, shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False, pin_memory: bool = False) -> SkippingLoader[ImageBatch]:
    """Batches ``(pixels [B, 3, H, W], labels [B], ids)`` of ``source`` preprocessed by ``transform``."""
    return SkippingLoader(map_source(source, Preprocess(transform)), collate_fn=collate_images,
                          batch_size=batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
                          drop_last=drop_last, pin_memory=pin_memory, description=source.spec)


def iter_good(source: DataSource, stats: SkipStats | None = None) -> Iterator[Sample]:
    """The good samples of ``source`` in order; bad ones are counted into ``stats`` and logged."""
    stats = stats if stats is not None else SkipStats()
    for item in source:
        if isinstance(item, BadSample):
            stats.add_bad(item, where=source.spec)
        else:
            stats.add_good()
            yield item
