"""``dinoforge index build``: a folder of images -> a serving index with thumbnails, in one resumable command.

Three steps, each safe to rerun after a crash:

1. features: the resumable batch extraction of ``core.extract`` writes ``INDEX/extract/``, the serving backend
   (artifact or ONNX export) computing the vectors, so they equal what ``dinoforge serve`` computes for a query;
2. index: the vectors go into the persisted serving index (``INDEX/meta.sqlite`` + snapshot), an id being
   replaced when it is already there;
3. thumbnails: one small JPEG per item under ``INDEX/thumbs/`` (missing ones only), so the page shows
   results without opening the source files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.core.config import build_config
from dinoforge.core.data import IndexedSource, Record, Sample, open_source
from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.extract import ExternalModel, ExtractConfig, FeatureStore, run_extraction
from dinoforge.core.fileio import atomic_write_json
from dinoforge.serve.backends import create_backend
from dinoforge.serve.backends.base import Backend
from dinoforge.serve.backends.exported import ExportedBackend
from dinoforge.serve.index_store import IndexStore
from dinoforge.core.pooling import Pooling, pooled_dim
from dinoforge.serve.pooling import PoolingOptions
from dinoforge.serve.settings import ServeSettings
from dinoforge.serve.thumbnails import thumb_path, write_thumbnail

log = logging.getLogger("dinoforge.serve.index_build")
EXTRACT_DIR, BUILD_FILE = "extract", "build.json"
UPSERT_ROWS = 2048  # rows per SQLite transaction


@dataclass
class BuildResult:
    """What a build did: rows in the index, inputs skipped, thumbnails found missing after extraction and made
    again (normally 0: they are written while extracting), seconds per step."""

    index_dir: Path
    count: int
    bad: int
    thumbnails_remade: int
    seconds: dict[str, float]

    @property
    def images_per_second(self) -> float:
        total = sum(self.seconds.values())
        return (self.count + self.bad) / total if total > 0 else 0.0


def open_backend(model: Path, threads: int | None = None) -> Backend:
    """The serving backend of ``model`` (artifact -> torch, ``.onnx`` / export folder -> ONNX Runtime)."""
    return create_backend(ServeSettings(model=model, warmup=False, intra_op_threads=threads))


def external_model(backend: Backend, pooling: Pooling) -> ExternalModel:
    """The backend as the extraction engine's model: its preprocessing contract and its pooled, normalised
    vectors (``{pooling: [B, D']}``), exactly as the server pools a query."""
    pre = backend.info.preprocessing
    uint8 = isinstance(backend, ExportedBackend) and backend.contract.uint8_input
    if uint8:  # the graph normalises itself: the loader hands over raw 0-255 values, made uint8 below
        pre = pre.model_copy(update={"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3})
    options = PoolingOptions(pooling=pooling, normalize=True)

    def compute(pixels: torch.Tensor) -> dict[str, np.ndarray]:  # [B, 3, H, W] -> {pooling: [B, D']}
        x = pixels.numpy()  # the extraction loader prepares torch tensors; backends take numpy
        if uint8:
            x = np.clip(np.round(x), 0, 255).astype(np.uint8)
        return {pooling: backend.post(backend.core(x), options)}

    return ExternalModel(preprocess=pre, sha256=backend.info.weights_sha256, embed_dim=backend.info.embed_dim,
                         compute=compute)


class _ThumbnailingSource(IndexedSource):
    """``source`` that also stores each image's thumbnail as it decodes it (in the extraction's loader workers),
    so a build decodes every image once."""

    def __init__(self, source: IndexedSource, index_dir: Path) -> None:
        self.source, self.index_dir = source, index_dir
        self.spec, self.classes = source.spec, source.classes

    def __len__(self) -> int:
        return len(self.source)

    def record(self, index: int) -> Record:
        return self.source.record(index)

    def _load_image(self, index: int, record: Record) -> Image.Image:
        image = self.source._load_image(index, record)  # the same decoding, plus a side effect
        if not thumb_path(self.index_dir, record.id).is_file():
            write_thumbnail(self.index_dir, record.id, image)
        return image


def _fill_index(index: IndexStore, store: FeatureStore, pooling: str, classes: list[str] | None) -> int:
    table = store.table(["id", "path", "label"]).to_pydict()
    vectors = store.vectors(pooling)
    for start in range(0, store.num_rows, UPSERT_ROWS):
        rows = np.arange(start, min(start + UPSERT_ROWS, store.num_rows))
        vecs = vectors.take(rows).astype(np.float32)  # [n, D'], already L2-normalised
        meta = []
        for r in rows:
            label = table["label"][r]
            item = {"path": table["path"][r]}
            if label is not None and label >= 0:
                item["label"] = classes[label] if classes and label < len(classes) else int(label)
            meta.append(item)
        index.upsert([table["id"][r] for r in rows], vecs, meta)
    return store.num_rows


def _missing_thumbnails(index_dir: Path, source: IndexedSource, ids: list[str], indices: list[int],
                      workers: int) -> int:
    todo = [(i, s) for i, s in zip(ids, indices, strict=True) if not thumb_path(index_dir, i).is_file()]

    def one(item: tuple[str, int]) -> bool:
        sample = source[item[1]]
        if not isinstance(sample, Sample):
            return False  # unreadable now although extraction read it: no thumbnail, the row stays searchable
        write_thumbnail(index_dir, item[0], sample.image)
        return True

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return sum(pool.map(one, todo))


def _job_dir(index_dir: Path, backend: Backend, input_spec: str, size: int) -> Path:
    """The extraction folder of this (model, input, input size): a grown folder starts a new job (the upserts
    and thumbnails of the old one are reused), a crashed run of the same job resumes."""
    key = f"{backend.info.weights_sha256}|{backend.info.default_pooling}|{input_spec}|{size}"
    return index_dir / EXTRACT_DIR / hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def _extract(model: Path, backend: Backend, source: IndexedSource, index_dir: Path, batch_size: int,
             num_workers: int, shard_size: int, progress: bool) -> FeatureStore:
    """Features (and thumbnails) of ``source``, resumable; earlier jobs of a smaller folder are removed."""
    job = _job_dir(index_dir, backend, source.spec, len(source))
    pooling = backend.info.default_pooling
    config = build_config(ExtractConfig, {
        "model": str(model), "input": source.spec, "output": str(job),
        "shard_size": shard_size, "features": (pooling,), "dtype": "float32", "batch_size": batch_size,
        "num_workers": num_workers, "progress": progress}, source="index build")
    run_extraction(config, external_model(backend, pooling), _ThumbnailingSource(source, index_dir))
    for old in job.parent.iterdir():  # earlier jobs (a smaller folder): their rows are in the index already
        if old != job and old.is_dir():
            shutil.rmtree(old)
    return FeatureStore(job)


def build_index(model: Path, input_spec: str, index_dir: Path, *, batch_size: int = 64, num_workers: int = 2,
                shard_size: int = 10_000, threads: int | None = None, progress: bool = True) -> BuildResult:
    """Build (or resume, or refresh) the serving index of ``input_spec`` in ``index_dir``.

    Raises:
        DataError / ConfigError / ArtifactError: a bad model or input, or an index of another model.
    """
    source = open_source(input_spec)
    if not isinstance(source, IndexedSource):
        raise DataError(f"--input {input_spec}: index build needs a folder, a manifest or a dataset with random "
                        "access (thumbnails are read back by position), not a stream of tar shards")
    if len(source) == 0:
        raise DataError(f"--input {input_spec} holds no images")
    backend = open_backend(model, threads)
    seconds: dict[str, float] = {}
    try:
        pooling = backend.info.default_pooling
        # opened first: an index of another model is refused before any work
        index = IndexStore(index_dir, dim=pooled_dim(backend.info.embed_dim, pooling), pooling=pooling,
                           model_sha256=backend.info.weights_sha256)
        try:
            t0 = time.perf_counter()
            store = _extract(model, backend, source, index_dir, batch_size, num_workers, shard_size, progress)
            seconds["extract"], t0 = time.perf_counter() - t0, time.perf_counter()
            rows = _fill_index(index, store, pooling, list(source.classes) if source.classes else None)
            count = index.count
        finally:
            index.close()
        seconds["index"], t0 = time.perf_counter() - t0, time.perf_counter()
        table = store.table(["id", "source_index"]).to_pydict()
        # normally none: thumbnails are written while extracting; these are the ones of a deleted thumbs/ folder
        written = _missing_thumbnails(index_dir, source, table["id"], table["source_index"], max(1, num_workers))
        seconds["thumbnails"] = time.perf_counter() - t0
    finally:
        backend.close()
    bad = store.bad().num_rows
    atomic_write_json(index_dir / BUILD_FILE, {"model": str(model), "input": input_spec, "rows": rows,
                                               "count": count, "bad": bad, "pooling": pooling,
                                               "seconds": {k: round(v, 3) for k, v in seconds.items()}})
    return BuildResult(index_dir=index_dir, count=count, bad=bad, thumbnails_remade=written, seconds=seconds)


def read_build_info(index_dir: Path) -> dict[str, object] | None:
    """The ``build.json`` of an index made by :func:`build_index` (``None`` for other indexes)."""
    try:
        return json.loads((index_dir / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def run_index_build(args: argparse.Namespace) -> int:
    """``dinoforge index build``: build, then print what to run next."""
    for name in ("batch_size", "num_workers", "shard_size"):
        if getattr(args, name) < (0 if name == "num_workers" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    result = build_index(args.model, args.input, args.index, batch_size=args.batch_size,
                         num_workers=args.num_workers, shard_size=args.shard_size, threads=args.threads,
                         progress=not args.no_progress)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"index {result.index_dir}: {result.count} images ({result.bad} skipped, listed in "
          f"{result.index_dir / EXTRACT_DIR}/*/bad.parquet); {result.thumbnails_remade} missing thumbnails re-made; "
          f"{times}")
    print(f"search it in a browser: dinoforge serve --model {args.model} --index {result.index_dir}  "
          "(then open http://127.0.0.1:8000/)")
    return 0
