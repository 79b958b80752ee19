"""WebDataset tar shards, read as a stream: members grouped by key into samples.

Convention (as in the ``webdataset`` package): a member ``dir/key.ext`` belongs to sample ``dir/key``; the key
is everything before the first ``.`` of the basename, so ``a.seg.png`` has extension ``seg.png``. Members of
one sample are adjacent in the tar. Shards are split over ranks, then over DataLoader workers.

Shards are opened through ``fsspec`` (:func:`dinoforge.core.data.stream.open_shard`): local paths, ``file://``,
``http(s)://`` and, with the matching fsspec back-end installed, object-store URLs (``s3://``, ``gs://``).
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from dinoforge.core.data.base import SampleOrBad, StreamingSource
from dinoforge.core.data.sample import BadSample, Sample
from dinoforge.core.data.stream import SHARD_READ_ERRORS, is_remote, local_path, open_shard, read_text
from dinoforge.core.errors import DataError, ImageDecodeError
from dinoforge.core.preprocess import DEFAULT_MAX_PIXELS, decode_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_TEXT_KEYS = frozenset({"txt", "cls", "id", "text", "caption", "label"})
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right.

    >>> expand_braces("s-{00..02}.tar")
    ['s-00.tar', 's-01.tar', 's-02.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} goes backwards")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in rng.groups())
        width = max(len(s) for s in rng.groups()) if padded else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _iter_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]] | BadSample]:
    """Yield ``(key, {ext: bytes})`` groups; a corrupt/truncated/unreachable shard ends with one :class:`BadSample`."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                base = posixpath.basename(name)
                if not member.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                member_key = posixpath.join(posixpath.dirname(name), stem)
                handle = tar.extractfile(member)
                if handle is None:  # only for members that are not regular files, already skipped above
                    continue
                data = handle.read()
                if member_key != key:
                    if key is not None:
                        yield key, parts
                    key, parts = member_key, {}
                parts[ext.lower()] = data
        if key is not None:
            yield key, parts
    except (tarfile.TarError, EOFError, zlib.error, *SHARD_READ_ERRORS) as err:
        yield BadSample(id=posixpath.basename(url), path=url, reason=f"corrupt or truncated tar shard, or unreachable "
                                                                     f"({err}); the rest of this shard is skipped")


def _decode_meta(ext: str, data: bytes) -> Any:
    if ext == "json":
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    if ext in _TEXT_KEYS:
        return data.decode("utf-8", errors="replace").strip()
    return data


def _label(meta: dict[str, Any], classes: list[str] | None) -> tuple[int | None, str | None]:
    """(label, problem) from ``cls`` or ``txt`` members."""
    if "cls" in meta:
        text = str(meta["cls"])
        return (int(text), None) if text.lstrip("-").isdigit() and int(text) >= 0 else \
            (None, f"'cls' member {text[:40]!r} is not a non-negative integer")
    if "txt" in meta:
        text = str(meta["txt"])
        if text.isdigit():
            return int(text), None
        if classes is not None:
            return (classes.index(text), None) if text in classes else (None, f"class {text[:40]!r} is unknown")
    return None, None


class WebDatasetSource(StreamingSource):
    """Samples streamed from WebDataset tar shards.

    Args:
        pattern: a shard path or URL with brace patterns (``/x/shards-{000..009}.tar``,
            ``https://host/s-{000..009}.tar``), or a list of shard paths/URLs.
        classes: names for ``txt`` labels (default: ``classes.txt`` beside the first shard, if present).
        shuffle: permute shards per epoch and shuffle samples through a buffer (seeded by ``seed``, epoch).
        seed: shuffling seed.
        buffer_size: shuffle buffer (samples) per worker.
        rank, world_size: this process's share of the shards in distributed jobs.
        max_pixels: decompression-bomb guard passed to ``decode_image``.

    Raises:
        DataError: a listed local shard does not exist (remote shards are not probed here: an unreachable one
            is read as one bad sample, like a corrupt shard).
    """

    def __init__(self, pattern: str | Sequence[str | Path], *, classes: Sequence[str] | None = None,
                 shuffle: bool = False, seed: int = 0, buffer_size: int = 1000, rank: int = 0, world_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.urls = expand_braces(pattern) if isinstance(pattern, str) else [str(p) for p in pattern]
        #: Each shard as a path (local) or the path part of its URL (remote): ``.name`` names the shard.
        self.shards: list[PurePath] = [PurePosixPath(u) if is_remote(u) else local_path(u) for u in self.urls]
        missing = [str(p) for u, p in zip(self.urls, self.shards, strict=True)
                   if not is_remote(u) and not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(self.shards)} WebDataset shards do not exist: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.spec = f"wds:{pattern}" if isinstance(pattern, str) else f"wds:{','.join(self.urls)}"
        if classes is None:
            names = read_text(posixpath.join(posixpath.dirname(self.urls[0]), "classes.txt"))
            classes = [ln.strip() for ln in names.splitlines() if ln.strip()] if names is not None else None
        self.classes = list(classes) if classes is not None else None
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, max(1, buffer_size)
        self.rank, self.world_size, self.max_pixels = rank, world_size, max_pixels

    def my_shard_indices(self) -> list[int]:
        """Indices (into :attr:`urls`) of the shards this rank and DataLoader worker reads this epoch, in order."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(order)).tolist()
        order = order[self.rank::self.world_size]
        info = get_worker_info()
        return order[info.id::info.num_workers] if info is not None else order

    def my_shards(self) -> list[PurePath]:
        """Shards this rank and DataLoader worker reads in the current epoch, in order."""
        return [self.shards[i] for i in self.my_shard_indices()]

    def raw_items(self, url: str) -> Iterator[tuple[str, str, dict[str, bytes]] | BadSample]:
        """Undecoded ``(shard url, key, members)`` groups of one shard, in tar order."""
        for item in _iter_tar(url):
            yield item if isinstance(item, BadSample) else (url, *item)

    def to_sample(self, url: str, key: str, parts: dict[str, bytes]) -> SampleOrBad:
        """Decode one group of members into a sample (or a bad-sample record)."""
        name = posixpath.basename(url)
        sample_id = f"{name}/{key}"
        image_key = next((k for k in IMAGE_KEYS if k in parts), None)
        if image_key is None:
            return BadSample(sample_id, None, f"no image member ({'/'.join(IMAGE_KEYS)}) among {sorted(parts)}")
        meta = {k: _decode_meta(k, v) for k, v in parts.items() if k != image_key}
        label, problem = _label(meta, self.classes)
        if problem:
            return BadSample(sample_id, None, problem)
        try:
            image = decode_image(parts[image_key], max_pixels=self.max_pixels)
        except ImageDecodeError as err:
            return BadSample(sample_id, None, str(err))
        meta.update(shard=name, key=key)
        return Sample(id=sample_id, image=image, label=label, path=None, meta=meta)

    def _raw(self) -> Iterator[tuple[str, str, dict[str, bytes]] | BadSample]:
        for index in self.my_shard_indices():
            yield from self.raw_items(self.urls[index])

    def _decode(self, item: tuple[str, str, dict[str, bytes]] | BadSample) -> SampleOrBad:
        return item if isinstance(item, BadSample) else self.to_sample(*item)

    def __iter__(self) -> Iterator[SampleOrBad]:
        if not self.shuffle:
            yield from map(self._decode, self._raw())
            return
        # The buffer holds undecoded bytes: decoding happens only when a sample leaves it.
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, info.id if info else 0])
        buffer: list[tuple[str, str, dict[str, bytes]] | BadSample] = []
        for item in self._raw():
            buffer.append(item)
            if len(buffer) >= self.buffer_size:
                yield self._decode(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            yield self._decode(buffer.pop(int(rng.integers(len(buffer)))))
