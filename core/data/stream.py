"""Streaming tar shards from anywhere (fsspec) in a global order that resumes at a position, whatever the ranks.

**Where.** :func:`open_shard` opens local paths, ``file://``, ``http(s)://`` (read front to back, no range
requests, so any plain web server works) and object-store URLs whose fsspec back-end is installed.

**Order.** :class:`ShardStreams` splits the shards into ``V`` *streams*: in epoch ``e`` the shards are permuted
by ``(seed, e)`` and stream ``v`` reads shards ``v, v + V, ...`` of that permutation, one after the other and
each in tar order, then goes on with epoch ``e + 1``. A training step of global batch ``G`` (``V`` divides
``G``) takes ``c = G / V`` consecutive samples of every stream: global position ``p`` is sample
``(p // G) * c + p % G % c`` of stream ``(p % G) // c``. The batch of a step is therefore a function of the
step and ``G`` alone, not of the world size, and a rank reads only the streams its rows of the batch use.
Within a stream, every sample of an epoch is read exactly once; resuming at step ``t`` (on any number of
ranks) skips each stream to ``t * c`` — whole shards at a time when ``wds-counts.json`` gives their sizes
(:func:`write_shard_counts`), else by reading the skipped members without decoding them.
"""

from __future__ import annotations

import json
import posixpath
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import fsspec
import numpy as np

from dinoforge.core.data.sample import BadSample
from dinoforge.core.errors import DataError



class ShardSource(Protocol):
    """What the stream machinery needs of a shard source (``WebDatasetSource``; a protocol, not an import,
    because the WebDataset reader imports this module)."""

    urls: Sequence[str]
    spec: str

    def raw_items(self, url: str) -> Iterator[tuple[str, str, dict[str, bytes]] | BadSample]:
        """The shard's items in stored order: ``(key, url, {extension: bytes})`` or a bad-sample marker."""
        ...


def _read_errors() -> tuple[type[BaseException], ...]:
    try:  # the HTTP back-end of fsspec raises aiohttp's errors for failed requests
        from aiohttp import ClientError
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
        return (OSError,)
    return (OSError, ClientError)


#: What reading a shard may raise besides tar errors: missing file, network failure, refused request.
SHARD_READ_ERRORS = _read_errors()
COUNTS_FILE = "wds-counts.json"
_PERM_KEY = 4
RawItem = tuple[str, str, dict[str, bytes]]


def is_remote(url: str) -> bool:
    """True for URLs other than local paths and ``file://``."""
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> Path:
    """The path of a local shard (``file://`` stripped, ``~`` expanded)."""
    return Path(url.removeprefix("file://")).expanduser()


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A binary file object reading ``url`` front to back."""
    if not is_remote(url):
        with open(local_path(url), "rb") as handle:
            yield handle
        return
    # block_size=0 streams the body: no range requests (which plain servers may not answer) and no size probe.
    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    with fsspec.open(url, "rb", **options) as handle:
        yield handle


def read_text(url: str) -> str | None:
    """The text of a small file beside the shards, ``None`` when it is absent or unreachable."""
    try:
        with open_shard(url) as handle:
            return handle.read().decode("utf-8")
    except (*SHARD_READ_ERRORS, UnicodeDecodeError):
        return None


def write_shard_counts(source: ShardSource, path: str | Path | None = None) -> dict[str, int]:
    """Count the items of every shard (as the reader yields them) into ``wds-counts.json`` beside local shards."""
    counts = {posixpath.basename(u): sum(1 for _ in source.raw_items(u)) for u in source.urls}
    target = Path(path) if path is not None else local_path(posixpath.join(posixpath.dirname(source.urls[0]),
                                                                           COUNTS_FILE))
    target.write_text(json.dumps(counts, indent=0, sort_keys=True))
    return counts


def read_shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Items per shard from ``wds-counts.json`` beside the first shard (``None`` if absent or incomplete)."""
    text = read_text(posixpath.join(posixpath.dirname(urls[0]), COUNTS_FILE))
    if text is None:
        return None
    try:
        table = json.loads(text)
        return [int(table[posixpath.basename(u)]) for u in urls]
    except (ValueError, KeyError, TypeError):
        return None


def choose_streams(global_batch: int, n_shards: int) -> int:
    """The most streams (best mixing) that divide the global batch and have a shard each."""
    return max(v for v in range(1, min(global_batch, n_shards) + 1) if global_batch % v == 0)


class ShardStreams:
    """The global sample order of a WebDataset source for steps of ``global_batch`` samples (module docstring).

    Args:
        source: the shards (its own shuffle/rank settings are not used).
        seed: seeds the per-epoch shard permutation.
        global_batch: samples per step over all ranks.
        n_streams: streams ``V`` (default: :func:`choose_streams`); must divide ``global_batch``.
    """

    def __init__(self, source: ShardSource, *, seed: int, global_batch: int, n_streams: int | None = None) -> None:
        n_streams = n_streams or choose_streams(global_batch, len(source.urls))
        if global_batch % n_streams or n_streams > len(source.urls):
            raise DataError(f"{n_streams} streams must divide the global batch ({global_batch}) and be at most the "
                            f"number of shards ({len(source.urls)})")
        self.source, self.seed, self.global_batch, self.n_streams = source, seed, global_batch, n_streams
        self.per_step = global_batch // n_streams
        self.counts = read_shard_counts(source.urls)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream ``[P]``, position inside that stream ``[P]``) of global positions ``[P]``."""
        step, j = np.divmod(np.asarray(positions, dtype=np.int64), self.global_batch)
        return j // self.per_step, step * self.per_step + j % self.per_step

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        """Shard indices stream ``stream`` reads in ``epoch``, in order."""
        order = np.random.default_rng([self.seed, _PERM_KEY, epoch]).permutation(len(self.source.urls))
        return order[stream::self.n_streams].tolist()

    def items(self, stream: int, start: int = 0) -> Iterator[RawItem | BadSample]:
        """Undecoded items of ``stream`` from its position ``start`` on (endless, epoch after epoch)."""
        skip, epoch = start, 0
        while True:
            read = 0
            for shard in self.shards_of(stream, epoch):
                if self.counts is not None and skip >= self.counts[shard]:
                    skip, read = skip - self.counts[shard], read + self.counts[shard]
                    continue  # known size: the whole shard is skipped without opening it
                for item in self.source.raw_items(self.source.urls[shard]):
                    read += 1
                    if skip:
                        skip -= 1
                    else:
                        yield item
            if not read:
                raise DataError(f"stream {stream} of {self.source.spec} holds no samples (its shards are empty)")
            epoch += 1


class StreamCursor:
    """Reads one stream forward, keeping a short look-ahead for replacing bad samples."""

    def __init__(self, streams: ShardStreams, stream: int) -> None:
        self.streams, self.stream = streams, stream
        self.position, self._items = 0, streams.items(stream, 0)
        self._ahead: deque[RawItem | BadSample] = deque()
        self._fresh = True

    def item(self, position: int, lookahead: int = 0) -> RawItem | BadSample:
        """The item at ``position + lookahead``.

        Moving forward reads and drops the items in between (undecoded); going back, or a first call, starts the
        stream afresh at ``position``.
        """
        if position < self.position or self._fresh:  # a new start skips by shard sizes when they are known
            self.position, self._items, self._ahead = position, self.streams.items(self.stream, position), deque()
        self._fresh = False
        while self.position < position:
            if self._ahead:
                self._ahead.popleft()
            else:
                next(self._items)
            self.position += 1
        while len(self._ahead) <= lookahead:
            self._ahead.append(next(self._items))
        return self._ahead[lookahead]
