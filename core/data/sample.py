"""What a data source yields: decoded samples, bad-sample records, and undecoded records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

#: Label value used in label arrays and batches for a sample without a label.
UNLABELLED = -1


@dataclass
class Sample:
    """One decoded image with its identity.

    Attributes:
        id: stable identifier (relative path, manifest id, ``<shard>/<key>``, ``fmnist:train:123``).
        image: RGB image decoded with :func:`dinoforge.core.preprocess.decode_image`.
        label: class index, or ``None`` when unlabelled.
        path: absolute file path when the sample is a file, else ``None``.
        meta: extra fields (manifest columns beyond path/label/id, extra WebDataset members).
    """

    id: str
    image: Image.Image
    label: int | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadSample:
    """Stands in for a sample that could not be read; loaders drop it, count it and list it."""

    id: str
    path: str | None
    reason: str

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path and self.path != self.id else ""
        return f"{self.id}{where}: {self.reason}"


@dataclass(frozen=True)
class Record:
    """An entry of an indexed source before decoding (cheap: no file is opened)."""

    id: str
    path: str | None
    label: int | None
    meta: Mapping[str, Any] = field(default_factory=dict)
