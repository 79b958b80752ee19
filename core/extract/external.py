"""Write embeddings computed elsewhere as an extraction output, so every consumer reads one format.

``write_feature_store`` takes chunks of vectors (any iterable, e.g. a generator over another system's
files) and produces the same layout as ``dinoforge extract`` (units of ``shard_size`` rows, float16/float32
``.npy`` parts, ``index.parquet``). The job's model is recorded as ``external`` with the fingerprint you
give, which is what a curation run keys its steps on. Curation recipes name such a store with the spec
``features:/path/to/store``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dinoforge.core.errors import DataError
from dinoforge.core.extract.plan import SHARDS_DIR, Unit, claim_output, job_spec
from dinoforge.core.extract.store import FeatureStore, finalize
from dinoforge.core.extract.writer import UnitWriter
from dinoforge.core.fileio import atomic_directory


def _rows(chunks: Iterable[np.ndarray], shard_size: int) -> Iterable[np.ndarray]:
    """Re-cut arbitrary chunks into blocks of exactly ``shard_size`` rows (the last one shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(np.asarray(chunk))
        held += len(chunk)
        while held >= shard_size:
            block = np.concatenate(pending)
            yield block[:shard_size]
            pending, held = [block[shard_size:]], held - shard_size
    if held:
        yield np.concatenate(pending)


def write_feature_store(out_dir: str | Path, chunks: Iterable[np.ndarray], *, num_rows: int, dim: int,
                        ids: Sequence[str] | None = None, paths: Sequence[str | None] | None = None,
                        labels: Sequence[int | None] | None = None, feature: str = "cls",
                        dtype: str = "float16", shard_size: int = 100_000,
                        fingerprint: str = "external") -> FeatureStore:
    """Store ``num_rows`` vectors of width ``dim`` (yielded in order by ``chunks``) as an extraction output.

    Args:
        out_dir: new folder (an existing extraction output with the same job is resumed unit by unit).
        chunks: arrays ``[m, dim]`` in row order.
        num_rows, dim: shape of the whole collection.
        ids, paths, labels: per row (default ids ``row-000000012``).
        feature: feature name the vectors are stored under.
        dtype: ``float16`` or ``float32`` on disk.
        shard_size: rows per unit.
        fingerprint: identity of the embedding model (recorded as the job's model hash).
    """
    out = Path(out_dir)
    units = [Unit(i, s, min(s + shard_size, num_rows)) for i, s in enumerate(range(0, num_rows, shard_size))]
    spec = job_spec(model_sha256=fingerprint, model="external", input_spec=f"external:{out.name}",
                    features=(feature,), dtype=dtype, fmt="npy", shard_size=shard_size, preprocess={}, units=units,
                    embed_dim=dim, num_inputs=num_rows)
    claim_output(out, spec)
    written = 0
    blocks = iter(_rows(chunks, shard_size))
    for unit, block in zip(units, blocks, strict=False):
        if block.shape != (unit.stop - unit.start, dim):
            raise DataError(f"rows {unit.start}:{unit.stop} came as shape {block.shape}, expected "
                            f"{(unit.stop - unit.start, dim)}")
        written += len(block)
        target = out / SHARDS_DIR / unit.name
        if target.is_dir():
            continue
        rows = range(unit.start, unit.stop)
        records = {"id": [ids[r] for r in rows] if ids is not None else [f"row-{r:09d}" for r in rows],
                   "path": [paths[r] for r in rows] if paths is not None else [None] * len(rows),
                   "label": [labels[r] for r in rows] if labels is not None else [None] * len(rows),
                   "source_index": list(rows), "content_hash": [None] * len(rows)}
        with atomic_directory(target) as staging:
            writer = UnitWriter(staging, part_rows=shard_size, fmt="npy", dtype=np.dtype(dtype))
            writer.append({feature: block}, records)
            writer.close({"seconds": 0.0, "start": unit.start, "stop": unit.stop, "tar": None})
    if written != num_rows or next(blocks, None) is not None:
        raise DataError(f"the chunks do not hold exactly num_rows={num_rows} rows")
    finalize(out)
    return FeatureStore(out)
