"""DataLoader plumbing for extraction: batches that never straddle two units, decoded in worker processes.

Both loaders yield :class:`UnitBatch` items. Decoding and preprocessing run in DataLoader workers (one
intra-op thread each), so the main process only runs the model and writes files.

* Indexed sources: a map-style dataset with a batch sampler that cuts each unit into batches; a unit is
  complete when the batch holding its last input has arrived.
* WebDataset: each worker streams whole tars (the data layer splits the tar list over workers) and batches
  them itself, ending every tar with a ``last`` batch (possibly empty), so units finish in any order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from dinoforge.core.data import BadSample, IndexedSource, Preprocess, Sample, WebDatasetSource
from dinoforge.core.errors import DataError, ImageDecodeError
from dinoforge.core.extract.plan import Unit
from dinoforge.core.preprocess import PreprocessConfig


@dataclass
class UnitBatch:
    """Preprocessed good inputs of one unit, plus the unit's inputs that were skipped.

    Attributes:
        unit: unit index.
        pixels: float32 ``[B, 3, H, W]`` (``None`` when every input of the batch was bad or B = 0).
        ids, paths, labels: per good input.
        indices: position of each good input in an indexed source (``None`` for streams).
        hashes: content hash of each good input's decoded RGB pixels (exact-duplicate detection).
        bad: skipped inputs.
        last: no more batches of this unit follow.
    """

    unit: int
    pixels: torch.Tensor | None
    ids: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)
    last: bool = False


Prepared = tuple[torch.Tensor, Sample, str, int | None]  # pixels, sample, content hash, source index


def _stack(unit: int, items: list[Prepared], bad: list[BadSample], last: bool) -> UnitBatch:
    shapes = {tuple(p[0].shape) for p in items}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes after preprocessing {sorted(shapes)[:3]} cannot share a "
                        "batch (patch_multiple keeps aspect); use --batch-size 1 or a fixed-size contract")
    pixels = torch.stack([p[0] for p in items]) if items else None
    return UnitBatch(unit, pixels, [p[1].id for p in items], [p[1].path for p in items],
                     [p[1].label for p in items], [p[3] for p in items], [p[2] for p in items], bad, last)


def content_hash(image: Image.Image) -> str:
    """128-bit BLAKE2b of the decoded RGB pixels and size: equal for the same image in any file format."""
    digest = hashlib.blake2b(f"{image.width}x{image.height}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def _preprocess(prep: Preprocess, item: Sample | BadSample, index: int | None) -> Prepared | BadSample:
    if isinstance(item, BadSample):
        return item
    try:
        pixels, _, _ = prep(item)
    except ImageDecodeError as err:
        return BadSample(item.id, item.path, str(err))
    return pixels, item, content_hash(item.image), index


# ---------------------------------------------------------------------------------------------- indexed
class _IndexedItems(Dataset):
    def __init__(self, source: IndexedSource, prep: Preprocess) -> None:
        self.source, self.prep = source, prep

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, Prepared | BadSample]:
        return index, _preprocess(self.prep, self.source[index], index)


class _UnitBatchSampler(Sampler[list[int]]):
    """Global indices unit by unit, cut into batches of at most ``batch_size`` inside each unit."""

    def __init__(self, units: list[Unit], batch_size: int) -> None:
        self.units, self.batch_size = units, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for unit in self.units:
            assert unit.start is not None and unit.stop is not None
            for start in range(unit.start, unit.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, unit.stop)))

    def __len__(self) -> int:
        return sum(-(-(u.size or 0) // self.batch_size) for u in self.units)


class _IndexedCollate:
    def __init__(self, units: list[Unit]) -> None:
        self.bounds = [(u.index, u.start, u.stop) for u in units]

    def __call__(self, items: list[tuple[int, Prepared | BadSample]]) -> UnitBatch:
        first = items[0][0]
        unit, _, stop = next(b for b in self.bounds if b[1] <= first < b[2])
        good = [x for _, x in items if not isinstance(x, BadSample)]
        bad = [x for _, x in items if isinstance(x, BadSample)]
        return _stack(unit, good, bad, last=max(i for i, _ in items) == stop - 1)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decode at a time per worker; more threads only oversubscribe the CPU


def indexed_loader(source: IndexedSource, units: list[Unit], preprocess: PreprocessConfig, *, batch_size: int,
                   num_workers: int) -> DataLoader:
    """Batches of the given units of an indexed source, in unit order."""
    return DataLoader(_IndexedItems(source, Preprocess(preprocess)),
                      batch_sampler=_UnitBatchSampler(units, batch_size), collate_fn=_IndexedCollate(units),
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None)


# ---------------------------------------------------------------------------------------------- streaming
def tar_name_of(sample_id: str) -> str:
    """The tar file name a WebDataset sample or bad record came from (ids are ``<tar name>/<key>``)."""
    return sample_id.split("/", 1)[0]


class _TarBatches(IterableDataset):
    def __init__(self, units: list[Unit], classes: list[str] | None, prep: Preprocess, batch_size: int) -> None:
        self.units, self.classes, self.prep, self.batch_size = units, classes, prep, batch_size

    def __iter__(self) -> Iterator[UnitBatch]:
        source = WebDatasetSource([u.tar for u in self.units if u.tar], classes=self.classes)
        unit_of = {os.path.basename(u.tar or ""): u.index for u in self.units}
        mine = [unit_of[p.name] for p in source.my_shards()]  # this worker's tars, in reading order
        pos, items, bad = 0, [], []
        for sample in source:
            unit = unit_of[tar_name_of(sample.id)]
            while mine[pos] != unit:  # earlier tars are finished (an empty tar yields no sample at all)
                yield _stack(mine[pos], items, bad, last=True)
                pos, items, bad = pos + 1, [], []
            out = _preprocess(self.prep, sample, None)
            (bad if isinstance(out, BadSample) else items).append(out)
            if len(items) + len(bad) >= self.batch_size:
                yield _stack(unit, items, bad, last=False)
                items, bad = [], []
        for rest in mine[pos:]:
            yield _stack(rest, items, bad, last=True)
            items, bad = [], []


def tar_loader(source: WebDatasetSource, units: list[Unit], preprocess: PreprocessConfig, *, batch_size: int,
               num_workers: int) -> DataLoader:
    """Batches of the given tar units; with several workers, units arrive interleaved."""
    workers = min(num_workers, len(units))
    dataset = _TarBatches(units, source.classes, Preprocess(preprocess), batch_size)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      worker_init_fn=_worker_init if workers else None)
