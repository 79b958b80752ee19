"""Adapter from :mod:`dinoforge.core.data` sources to what the pretraining pipeline reads.

A step's images are a function of the step (so resuming needs no iterator state):

* any *indexed* core source — image folders, manifests (curation manifests and memory-mapped Arrow
  manifests included), Fashion-MNIST, and their subsets/selections — is read by row
  (:class:`PretrainSource`), the row of a stream position coming from a seeded per-epoch order;
* WebDataset shards (local or behind any fsspec URL) are read as shard streams (:class:`PretrainStream`,
  :mod:`dinoforge.core.data.stream`), each rank opening only the streams its rows of a batch use.

Unreadable files do not stop a run: the sample is replaced by the next readable entry of the source (of the
same shard stream for shards), deterministically, so resumed and multi-rank runs see the same replacement,
and counted.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from dinoforge.core.data import (BadSample, FashionMNISTSource, IndexedSource, SubsetSource, WebDatasetSource,
                                 open_source)
from dinoforge.core.data.stream import ShardStreams, StreamCursor
from dinoforge.core.errors import DataError
from dinoforge.core.preprocess import pil_to_uint8

log = logging.getLogger(__name__)
_MAX_CONSECUTIVE_BAD = 100


class PretrainSource:
    """uint8 images by index from an indexed core source.

    Args:
        source: an opened indexed source.

    Attributes:
        labels: ``int64 [N]`` (-1 = unlabelled); used only by monitoring k-NN.
        fingerprint: SHA-256 of the spec and the ordered sample ids (recorded in artifact provenance).
    """

    def __init__(self, source: IndexedSource) -> None:
        self.source = source
        self.spec = source.spec
        self._array, self._rows = _raw_array(source)
        self.bad_count = 0
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> np.ndarray:
        """Class labels, -1 where unlabelled."""
        if self._labels is None:
            self._labels = np.asarray(self.source.labels, dtype=np.int64)
        return self._labels

    @property
    def fingerprint(self) -> str:
        """Identity of the data: hash of the spec and the ordered ids."""
        digest = hashlib.sha256(self.spec.encode())
        for sample_id in self.source.ids:
            digest.update(b"\n" + str(sample_id).encode())
        return digest.hexdigest()

    def image(self, index: int) -> torch.Tensor:
        """uint8 ``[C, H, W]`` of entry ``index`` (C = 1 for the grey Fashion-MNIST fast path, else 3)."""
        if self._array is not None:
            row = int(self._rows[index]) if self._rows is not None else index
            return torch.from_numpy(np.array(self._array[row], copy=True)).unsqueeze(0)  # [1, H, W]
        for offset in range(_MAX_CONSECUTIVE_BAD):
            sample = self.source[(index + offset) % len(self.source)]
            if not isinstance(sample, BadSample):
                return pil_to_uint8(sample.image)
            self.bad_count += 1
            log.warning("skipping unreadable training sample %s (using the next entry instead)", sample)
        raise DataError(f"{_MAX_CONSECUTIVE_BAD} consecutive unreadable samples in {self.spec} from index {index}")

    def images(self, indices: np.ndarray) -> list[torch.Tensor]:
        """uint8 ``[C, H, W]`` images of rows ``indices [B]``."""
        return [self.image(int(i)) for i in indices]


class PretrainStream:
    """uint8 images at global stream positions of WebDataset shards (see :class:`ShardStreams`).

    Args:
        source: the shards; :meth:`bind` must be called (with the run's seed and global batch) before reading.

    Attributes:
        fingerprint: SHA-256 of the spec and the ordered shard URLs.
    """

    def __init__(self, source: WebDatasetSource) -> None:
        self.source, self.spec = source, source.spec
        self.bad_count = 0
        self.streams: ShardStreams | None = None
        self._cursors: dict[int, StreamCursor] = {}

    def bind(self, *, seed: int, global_batch: int, n_streams: int | None = None) -> None:
        """Fix the order: the shard permutation seed and the global batch (positions per step)."""
        self.streams = ShardStreams(self.source, seed=seed, global_batch=global_batch, n_streams=n_streams)
        self._cursors = {}

    @property
    def fingerprint(self) -> str:
        """Identity of the data: hash of the spec and the ordered shard URLs."""
        digest = hashlib.sha256(self.spec.encode())
        for url in self.source.urls:
            digest.update(b"\n" + url.encode())
        return digest.hexdigest()

    def __getstate__(self) -> dict[str, object]:
        # Open shards (files, HTTP responses) stay in the process that opened them; a worker opens its own.
        return {**self.__dict__, "_cursors": {}}

    def images(self, positions: np.ndarray) -> list[torch.Tensor]:
        """uint8 ``[3, H, W]`` images at global stream positions ``positions [B]``."""
        if self.streams is None:
            raise DataError(f"{self.spec}: bind() the shard streams to the run's seed and global batch first")
        streams, offsets = self.streams.locate(positions)
        return [self._image(int(v), int(q)) for v, q in zip(streams, offsets, strict=True)]

    def _image(self, stream: int, offset: int) -> torch.Tensor:
        cursor = self._cursors.get(stream)
        if cursor is None:
            cursor = self._cursors[stream] = StreamCursor(self.streams, stream)  # type: ignore[arg-type]
        for ahead in range(_MAX_CONSECUTIVE_BAD):
            item = cursor.item(offset, ahead)
            sample = item if isinstance(item, BadSample) else self.source.to_sample(*item)
            if not isinstance(sample, BadSample):
                return pil_to_uint8(sample.image)
            self.bad_count += 1
            log.warning("skipping unreadable training sample %s (using the next one of its stream instead)", sample)
        raise DataError(f"{_MAX_CONSECUTIVE_BAD} consecutive unreadable samples in stream {stream} of {self.spec}")


def _raw_array(source: IndexedSource) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Fashion-MNIST (or a subset of it) is read straight from its uint8 array, skipping PIL."""
    if isinstance(source, FashionMNISTSource):
        return source.images, None
    if isinstance(source, SubsetSource) and isinstance(source.parent, FashionMNISTSource):
        return source.parent.images, source.indices
    return None, None


def open_pretrain_source(spec: str) -> PretrainSource | PretrainStream:
    """Open a core data source for pretraining.

    Raises:
        DataError: unknown or missing data, an empty source, or a stream that is not WebDataset shards
            (a selection of a stream, for instance).
    """
    source = open_source(spec, download=False) if str(spec).startswith("fmnist:") else open_source(spec)
    if isinstance(source, WebDatasetSource):
        return PretrainStream(source)
    if not isinstance(source, IndexedSource):
        raise DataError(f"pretraining reads random-access sources (folder, manifest, fmnist) or whole WebDataset "
                        f"shard sets; {spec!r} is another kind of stream (drop the selection, or write a manifest)")
    if len(source) == 0:
        raise DataError(f"data source {spec!r} holds no samples")
    return PretrainSource(source)
