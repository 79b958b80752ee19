"""``dinoforge embed`` as a job that survives bad files and interruptions.

* A refused image is named by its path (the server names ``input[i]`` of a batch; the job knows the file).
* With ``skip_bad``, an image the server refuses (422 / 413 naming it) or a file that cannot be read is left out
  and recorded with its reason; the rest of its batch is sent again.
* With a journal (``--out`` given), every finished batch is appended to ``OUT.partial.jsonl`` and fsynced; a
  rerun skips what the journal holds, so an interrupted run loses at most the batches in flight. The final
  output is written atomically and the journal removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dinoforge.core.errors import ConfigError, DataError
from dinoforge.serve.client import AsyncDinoforgeClient, ClientError
from dinoforge.serve.client_inputs import ImageRef
from dinoforge.serve.wire import decode_vector

_INPUT = re.compile(r"input\[(\d+)\]:?\s*")
#: statuses whose message names one refused image (``input[i]: ...``)
_PER_IMAGE = frozenset({413, 422})


@dataclass(frozen=True)
class BadImage:
    """An image left out: its path, the HTTP status (0: not read) and the reason."""

    name: str
    status: int
    reason: str


@dataclass
class EmbedOutcome:
    """Vectors ``[N, D]`` float32 of the good images in input order, their names, and the images left out."""

    names: list[str]
    vectors: np.ndarray
    bad: list[BadImage] = field(default_factory=list)


class Journal:
    """Append-only JSON lines beside the output: a header with the options, then one line per image."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        self.path, self.options = path, options

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, BadImage]]:
        """What earlier runs finished; a torn last line (a crash mid-write) is ignored."""
        done: dict[str, np.ndarray] = {}
        bad: dict[str, BadImage] = {}
        if not self.path.exists():
            return done, bad
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]).get("options") != self.options:
            raise ConfigError(f"{self.path} holds a run with other options ({lines[0]}); rerun with the same "
                              "options or delete it to start over")
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "embedding" in row:
                done[row["id"]] = decode_vector(row["embedding"])
            else:
                bad[row["id"]] = BadImage(row["id"], row["status"], row["reason"])
        return done, bad

    def append(self, rows: list[tuple[str, str]], bad: list[BadImage]) -> None:
        """Record finished images (``(name, base64 float32)``) durably before they count as done."""
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as handle:
            if new:
                handle.write(json.dumps({"options": self.options}) + "\n")
            for name, vec in rows:
                handle.write(json.dumps({"id": name, "embedding": vec}) + "\n")
            for b in bad:
                handle.write(json.dumps({"id": b.name, "status": b.status, "reason": b.reason}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _named(err: ClientError, batch: Sequence[ImageRef]) -> tuple[int | None, str]:
    """Which image of ``batch`` the server refused, and the message with its path instead of ``input[i]``."""
    match = _INPUT.search(str(err))
    if err.status not in _PER_IMAGE or match is None or int(match.group(1)) >= len(batch):
        return None, str(err)
    index = int(match.group(1))
    return index, f"{batch[index].name}: {_INPUT.sub('', str(err), count=1)}"


def _payload(batch: Sequence[ImageRef], options: dict[str, Any], skip_bad: bool,
             bad: list[BadImage]) -> tuple[list[ImageRef], dict[str, Any]]:
    """The request for the readable images of ``batch`` (unreadable ones are bad or an error)."""
    kept, images = [], []
    for ref in batch:
        try:
            images.append(ref.b64())
        except DataError as err:
            if not skip_bad:
                raise
            bad.append(BadImage(ref.name, 0, str(err)))
            continue
        kept.append(ref)
    return kept, {"input": images, "encoding_format": "base64", **options}


async def embed_batch(client: AsyncDinoforgeClient, batch: Sequence[ImageRef], options: dict[str, Any], *,
                      skip_bad: bool) -> tuple[list[tuple[str, str]], list[BadImage]]:
    """Embed one batch; refused images are left out (``skip_bad``) or raise a :class:`ClientError` naming them."""
    bad: list[BadImage] = []
    refs = list(batch)
    while True:
        refs, payload = await asyncio.to_thread(_payload, refs, options, skip_bad, bad)  # file reads off the loop
        if not refs:
            return [], bad
        try:
            body = await client.request("POST", "/v1/embeddings", json=payload)
        except ClientError as err:
            index, message = _named(err, refs)
            if index is None or not skip_bad:
                raise ClientError(message, status=err.status) from None
            bad.append(BadImage(refs[index].name, err.status, message.removeprefix(f"{refs[index].name}: ")))
            refs = refs[:index] + refs[index + 1:]
            continue
        return [(ref.name, item["embedding"]) for ref, item in zip(refs, body["data"], strict=True)], bad


async def run_embed_job(client: AsyncDinoforgeClient, refs: Sequence[ImageRef], options: dict[str, Any], *,
                        journal: Journal | None, skip_bad: bool, progress: bool) -> EmbedOutcome:
    """Embed ``refs`` with ``client.concurrency`` batches in flight, resuming from and recording to ``journal``."""
    done, old_bad = journal.load() if journal is not None else ({}, {})
    todo = [r for r in refs if r.name not in done and r.name not in old_bad]
    vectors: dict[str, np.ndarray] = dict(done)
    bad: dict[str, BadImage] = dict(old_bad)
    gate = asyncio.Semaphore(client.concurrency)
    bar = tqdm(total=len(refs), initial=len(refs) - len(todo), disable=not progress, unit="img", desc="embed")

    async def one(batch: Sequence[ImageRef]) -> None:
        async with gate:
            rows, refused = await embed_batch(client, batch, options, skip_bad=skip_bad)
        if journal is not None:
            await asyncio.to_thread(journal.append, rows, refused)
        vectors.update((name, decode_vector(vec)) for name, vec in rows)
        bad.update((b.name, b) for b in refused)
        bar.update(len(batch))

    try:
        size = client.batch_size
        await asyncio.gather(*(one(todo[i:i + size]) for i in range(0, len(todo), size)))
    finally:
        bar.close()
    names = [r.name for r in refs if r.name in vectors]
    stacked = np.stack([vectors[n] for n in names]).astype(np.float32) if names else np.zeros((0, 0), np.float32)
    return EmbedOutcome(names, stacked, [bad[r.name] for r in refs if r.name in bad])
