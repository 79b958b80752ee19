"""Adapter from :mod:`dinoforge.core.data` sources to what the pretraining pipeline reads.

Pretraining needs random access (its sampler is a seeded permutation per epoch, so a step's images are a
function of the step and resuming needs no iterator state): any *indexed* core source works — image
folders, manifests (curation manifests included), Fashion-MNIST, and their subsets/selections. Streaming
WebDataset shards are refused with a clear error.

Unreadable files do not stop a run: the sample is replaced by the next readable entry of the source
(deterministically, so resumed and multi-rank runs see the same replacement) and counted.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from dinoforge.core.data import BadSample, FashionMNISTSource, IndexedSource, SubsetSource, open_source
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


def _raw_array(source: IndexedSource) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Fashion-MNIST (or a subset of it) is read straight from its uint8 array, skipping PIL."""
    if isinstance(source, FashionMNISTSource):
        return source.images, None
    if isinstance(source, SubsetSource) and isinstance(source.parent, FashionMNISTSource):
        return source.parent.images, source.indices
    return None, None


def open_pretrain_source(spec: str) -> PretrainSource:
    """Open a core data source for pretraining.

    Raises:
        DataError: unknown or missing data, an empty source, or a streaming (non-indexed) source.
    """
    source = open_source(spec, download=False) if str(spec).startswith("fmnist:") else open_source(spec)
    if not isinstance(source, IndexedSource):
        raise DataError(f"pretraining needs a random-access source (folder, manifest, fmnist); {spec!r} is a "
                        "streaming source. Write a manifest of its files instead.")
    if len(source) == 0:
        raise DataError(f"data source {spec!r} holds no samples")
    return PretrainSource(source)
