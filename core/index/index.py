"""A thin wrapper over a faiss index: build from a streamed collection, search in batches, save atomically.

Typical use::

    index = VectorIndex.build(ShardedVectors(memmaps), IndexConfig())   # plan, train on a sample, add chunks
    report = tune_index(index, database)                                 # nprobe for recall@10 >= 0.95
    scores, ids = index.search(queries, k=10)                            # [nq, 10] each
    index.save("pool.index")                                             # directory, written atomically

Ids are the rows of the collection in the order they were added (0, 1, ...), unless the index was created
with ``with_ids=True`` and vectors are added with explicit int64 ids (the serving layer's case).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dinoforge.core.errors import ConfigError, DataError, MissingDependencyError
from dinoforge.core.fileio import atomic_directory
from dinoforge.core.index.config import IVF_KINDS, IndexConfig, IndexPlan, plan_index
from dinoforge.core.index.exact import faiss_metric
from dinoforge.core.index.vectors import VectorSource, check_finite, l2_normalize, sample_rows
from dinoforge.core.runtime import resolve_device

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_device(device: str) -> str:
    """Where faiss runs for a device choice: ``cpu`` or ``cuda``.

    The names are those of every device (:func:`dinoforge.core.runtime.resolve_device`), but the GPU that
    counts is faiss's: ``auto`` takes it only when this faiss build has GPU support, and ``cuda`` without it
    is an error rather than a silent CPU fallback.

    Raises:
        MissingDependencyError: ``cuda`` with a faiss build that has no GPU support or sees no GPU.
        ConfigError: a malformed device name.
    """
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device.startswith("cuda") and not gpu_available():
        raise MissingDependencyError("device 'cuda' needs the faiss-gpu package and a visible GPU; "
                                     "this faiss build has none (use device 'cpu' or 'auto')")
    return resolve_device(device).type


class VectorIndex:
    """A faiss index plus the plan and config it was built from.

    Args:
        index: the faiss index (CPU).
        plan: what was chosen and why.
        config: build/search settings.
        device: ``cpu`` or ``cuda`` (GPU copies are made for search, saves always write the CPU index).
    """

    def __init__(self, index: faiss.Index, plan: IndexPlan, config: IndexConfig, *, device: str = "cpu") -> None:
        self.plan = plan
        self.config = config
        self.device = faiss_device(device)
        self.search_params: dict[str, int] = {}
        self.last_recall: dict[str, Any] | None = None
        self._gpu_resources = None
        self.index = self._to_device(index)
        self._apply_default_params()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, dim: int, expected_rows: int, config: IndexConfig | None = None, *,
               with_ids: bool = False) -> VectorIndex:
        """An empty (untrained) index planned for ``expected_rows`` vectors of width ``dim``."""
        config = config or IndexConfig()
        plan = plan_index(expected_rows, dim, config, with_ids=with_ids)
        index = faiss.index_factory(dim, plan.factory, faiss_metric(config.metric))
        if plan.kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = config.ef_construction
        if with_ids and plan.kind in ("flat", "hnsw"):
            index = faiss.IndexIDMap2(index)  # IVF indexes take explicit ids natively
        return cls(index, plan, config, device=config.device)

    @classmethod
    def build(cls, source: VectorSource, config: IndexConfig | None = None) -> VectorIndex:
        """Plan for ``source``'s size, train on a sample of it and add all of it (chunk by chunk)."""
        config = config or IndexConfig()
        index = cls.create(source.dim, source.num_rows, config)
        index.train(source)
        index.add_source(source)
        return index

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if self.device != "cuda":
            return index
        if self.plan.kind in ("hnsw", "ivf_pq_fs"):
            log.warning("faiss has no GPU version of %s; searching on the CPU", self.plan.factory)
            return index
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def cpu_index(self) -> faiss.Index:
        """The index as a CPU faiss object (a copy when it lives on the GPU)."""
        return faiss.index_gpu_to_cpu(self.index) if self._gpu_resources is not None else self.index

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Vector width."""
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index can take vectors."""
        return bool(self.index.is_trained)

    # ------------------------------------------------------------------ training and adding
    def _prepare(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"{what} must be [n, {self.dim}], got shape {tuple(x.shape)}")
        x = l2_normalize(x) if self.config.metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)
        check_finite(x, what)
        return x

    def train(self, source: VectorSource) -> None:
        """Train on a seeded sample of ``plan.train_size`` rows (no-op for Flat and HNSW)."""
        if self.is_trained:
            return
        rows = sample_rows(source.num_rows, self.plan.train_size, self.config.seed)
        if rows.size < 39 * (self.plan.nlist or 1):
            raise DataError(f"{self.plan.factory} needs at least {39 * (self.plan.nlist or 1)} training vectors, "
                            f"the collection has {source.num_rows}")
        x = self._prepare(source.take(rows), "training vectors")
        start = time.perf_counter()
        self.index.train(x)
        log.info("trained %s on %d vectors in %.1f s", self.plan.factory, len(x), time.perf_counter() - start)

    def add(self, x: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Add float ``[n, d]`` vectors; ``ids`` (int64 ``[n]``) only for indexes created ``with_ids``."""
        if not self.is_trained:
            raise DataError("the index is not trained yet: call train() first")
        x = self._prepare(x, "vectors")
        if ids is None:
            self.index.add(x)
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (x.shape[0],):
            raise DataError(f"ids must be [{x.shape[0]}], got shape {tuple(ids.shape)}")
        try:
            self.index.add_with_ids(x, ids)
        except RuntimeError as err:
            raise DataError(f"this {self.plan.factory} index takes no explicit ids (create it with_ids=True): "
                            f"{err}") from err

    def add_source(self, source: VectorSource) -> None:
        """Add every row of ``source`` in order, one chunk at a time."""
        start = time.perf_counter()
        for _, chunk in source.iter_chunks(self.config.chunk_rows):
            self.add(chunk)
        log.info("added %d vectors to %s in %.1f s", source.num_rows, self.plan.factory,
                 time.perf_counter() - start)

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed (HNSW and the fast-scan kind cannot remove)."""
        if self.plan.kind in ("hnsw", "ivf_pq_fs"):
            raise ConfigError(f"{self.plan.factory} indexes cannot remove vectors; rebuild the index instead")
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        return int(self.index.remove_ids(selector))

    # ------------------------------------------------------------------ search
    def _apply_default_params(self) -> None:
        if self.plan.kind == "ivf_pq_fs":
            self.set_search_params(k_factor=self.config.k_factor)
        if self.plan.kind in IVF_KINDS:
            self.set_search_params(nprobe=self.config.nprobe or min(self.plan.nlist or 1, 16))
        elif self.plan.kind == "hnsw":
            self.set_search_params(ef_search=self.config.ef_search or 64)

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None,
                          k_factor: int | None = None) -> None:
        """Set IVF ``nprobe``, HNSW ``efSearch`` and/or the fast-scan index's re-ranking ``k_factor`` (each
        ignored by indexes that have no such knob)."""
        space = faiss.GpuParameterSpace() if self._gpu_resources is not None else faiss.ParameterSpace()
        if k_factor is not None and self.plan.kind == "ivf_pq_fs":
            space.set_index_parameter(self.index, "k_factor_rf", int(k_factor))
            self.search_params["k_factor"] = int(k_factor)
        if nprobe is not None and self.plan.kind in IVF_KINDS:
            nprobe = max(1, min(int(nprobe), self.plan.nlist or 1))
            space.set_index_parameter(self.index, "nprobe", nprobe)
            self.search_params["nprobe"] = nprobe
        if ef_search is not None and self.plan.kind == "hnsw":
            space.set_index_parameter(self.index, "efSearch", int(ef_search))
            self.search_params["ef_search"] = int(ef_search)

    def _selector(self, allowed: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
        """A faiss selector admitting the ids where ``allowed`` (bool ``[ntotal]``) is True, and its bitmap."""
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (self.ntotal,):
            raise DataError(f"allowed must be a bool mask of length {self.ntotal}, got {allowed.shape}")
        if self._gpu_resources is not None:
            raise ConfigError("restricted search (allowed=...) runs on CPU indexes only")
        bitmap = np.packbits(allowed, bitorder="little")  # must outlive the search call
        return faiss.IDSelectorBitmap(allowed.size, faiss.swig_ptr(bitmap)), bitmap

    def refine_factor(self, k: int) -> float:
        """Re-ranking multiplier of the fast-scan index for a top-``k`` search.

        Tuning measures recall@10, so the tuned ``k_factor * 10`` candidates are re-ranked whatever ``k`` is
        (never fewer than ``k``): a self-deduplication asking for 65 neighbours re-ranks what a top-10 search
        does instead of 6.5 times more, which is where its time went (each candidate is a random read of its
        float32 vector).
        """
        return max(1.0, self.search_params["k_factor"] * 10 / k)

    def _params(self, allowed: np.ndarray | None, k: int) -> tuple[faiss.SearchParameters | None, Any]:
        """Per-call search parameters: the fast-scan index's re-ranking depth for ``k``, and/or a restriction
        of results to ids where ``allowed`` is True."""
        selector, bitmap = self._selector(allowed) if allowed is not None else (None, None)
        if self.plan.kind == "ivf_pq_fs":  # the selector filters the candidates; re-ranking keeps their order
            base = faiss.SearchParametersIVF(nprobe=self.search_params.get("nprobe", 1))
            if selector is not None:
                base.sel = selector
            params = faiss.IndexRefineSearchParameters(k_factor=self.refine_factor(k), base_index_params=base)
            return params, (bitmap, selector, base)
        if selector is None:
            return None, None
        if self.plan.kind in ("ivf_flat", "ivf_pq"):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.search_params.get("nprobe", 1))
        elif self.plan.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.search_params.get("ef_search", 64))
        else:
            params = faiss.SearchParameters(sel=selector)
        return params, (bitmap, selector)

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """Top-k of each query, in batches of ``config.search_batch``.

        Args:
            queries: float ``[nq, d]``.
            k: neighbours per query.
            allowed: optional bool ``[ntotal]``: only ids marked True may be returned (sequential-id indexes).

        Returns:
            ``scores [nq, k]`` float32 (cosine/ip similarity, or squared L2 distance; best first) and
            ``ids [nq, k]`` int64 (-1 where fewer than k vectors were found).
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        queries = self._prepare(queries, "queries")
        params, _keep_alive = self._params(allowed, k)
        scores = np.empty((queries.shape[0], k), dtype=np.float32)
        ids = np.empty((queries.shape[0], k), dtype=np.int64)
        step = self.config.search_batch
        for start in range(0, queries.shape[0], step):
            batch = queries[start:start + step]
            s, i = self.index.search(batch, k) if params is None else self.index.search(batch, k, params=params)
            scores[start:start + step], ids[start:start + step] = s, i  # [b, k]
        return scores, ids

    def search_source(self, source: VectorSource, k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Search every row of ``source``, yielding ``(first_row, scores [m, k], ids [m, k])`` per chunk."""
        for start, chunk in source.iter_chunks(self.config.search_batch):
            scores, ids = self.search(chunk, k)
            yield start, scores, ids

    # ------------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """Plan, config, size and search parameters as a JSON-ready dictionary."""
        return {"format_version": FORMAT_VERSION, "plan": self.plan.to_dict(),
                "config": self.config.model_dump(mode="json"), "ntotal": self.ntotal, "dim": self.dim,
                "search_params": dict(self.search_params), "recall": self.last_recall}

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write ``path/index.faiss`` and ``path/index.json`` atomically (the directory appears complete)."""
        path = Path(path)
        try:
            with atomic_directory(path, overwrite=overwrite) as staging:
                faiss.write_index(self.cpu_index(), str(staging / INDEX_FILE))
                (staging / META_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        except FileExistsError as err:
            raise DataError(f"{path} already exists") from err
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, mmap: bool = False) -> VectorIndex:
        """Load an index saved by :meth:`save`.

        With ``mmap`` the index data is mapped from disk (read-only) instead of read into memory. :meth:`save`
        replaces files by rename, so a mapped index stays valid when a new one is saved over it; never
        truncate or rewrite a mapped ``index.faiss`` in place (the process would die of SIGBUS).
        """
        path = Path(path)
        meta_path, index_path = path / META_FILE, path / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise DataError(f"{path} is not a saved index (expected {META_FILE} and {INDEX_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
            plan = IndexPlan(**meta["plan"])
            config = IndexConfig.model_validate({**meta["config"], **({"device": device} if device else {})})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{meta_path} is not a valid index description: {err}") from err
        if meta.get("format_version", 1) > FORMAT_VERSION:
            raise DataError(f"{meta_path} has format_version {meta['format_version']}; this dinoforge reads "
                            f"up to {FORMAT_VERSION}")
        try:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            raw = faiss.read_index(str(index_path), flags)
        except RuntimeError as err:
            raise DataError(f"{index_path} is not a readable faiss index: {err}") from err
        out = cls(raw, plan, config, device=config.device)
        out.set_search_params(**meta.get("search_params", {}))
        out.last_recall = meta.get("recall")
        return out
