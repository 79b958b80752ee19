"""Index configuration and the size-based choice of a faiss index (in the spirit of autofaiss).

The rule (``kind="auto"``), with ``n`` vectors of width ``d``:

* ``n <= flat_max`` -> ``Flat``: exact search. Also the ground truth every other index is checked against.
* ``n <= ivf_max`` and the raw float32 vectors (``4 n d`` bytes) fit ``memory_budget_gb`` -> ``IVF{nlist},Flat``:
  inverted lists over k-means cells, exact scores inside the probed cells. Cheaper to build than HNSW on a
  CPU (one k-means on a sample plus one assignment pass) and its cells double as a coarse clustering.
* ``n > fast_scan_min`` (and raw vectors in the budget) -> ``IVF{nlist/2},PQ{d/4}x4fs,RFlat``: 4-bit product
  codes scanned with SIMD look-up tables (several times faster than scanning float32 vectors), then the best
  ``k_factor * 10`` (at least ``k``) candidates re-ranked with the exact float32 vectors. At a million
  vectors the scan of IVF-Flat dominates a self-deduplication (every row is a query); this keeps its recall
  at a fraction of the cost. Indexes that must take explicit ids or remove vectors (the serving index) never get it.
* otherwise -> ``IVF{nlist},PQ{m}x8np``: product-quantised codes (``m`` bytes per vector) for pools whose raw
  vectors do not fit in memory.

``nlist`` defaults to ``4 * sqrt(n)`` rounded to a power of two (within ``[16, 65536]``); training uses at most
``train_per_list * nlist`` sampled vectors. HNSW (``kind="hnsw"``) is available on request.

Search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW) are either given or tuned after building:
doubled until recall@10 against exact search on a sample reaches ``target_recall``; for the fast-scan index
the re-ranking depth ``k_factor`` is then doubled if probing every cell was not enough.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import ConfigError

IndexKind = Literal["auto", "flat", "ivf_flat", "hnsw", "ivf_pq", "ivf_pq_fs"]
#: Kinds searched through inverted lists (they take ``nprobe``).
IVF_KINDS = ("ivf_flat", "ivf_pq", "ivf_pq_fs")
Metric = Literal["cosine", "ip", "l2"]
Device = Literal["cpu", "cuda", "auto"]


class IndexConfig(StrictModel):
    """How to build and search a vector index."""

    kind: IndexKind = "auto"
    metric: Metric = Field("cosine", description="cosine = inner product on L2-normalised vectors")
    flat_max: int = Field(65_536, ge=0, description="auto: exact Flat search up to this many vectors")
    ivf_max: int = Field(4_000_000, ge=1, description="auto: IVF-Flat up to this many vectors, IVF-PQ above")
    memory_budget_gb: float = Field(8.0, gt=0, description="auto: IVF-PQ when raw vectors exceed this")
    fast_scan_min: int = Field(500_000, ge=0, description="auto: fast-scan IVF-PQ + re-ranking above this many "
                                                         "vectors (when they fit the memory budget)")
    k_factor: int = Field(16, ge=1, description="fast-scan index: k_factor * 10 candidates (at least k) are "
                                                "re-ranked exactly; raised by tuning when nprobe alone misses "
                                                "the target")
    nlist: int | None = Field(None, ge=1, description="IVF cells (default 4*sqrt(n), a power of two)")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantisers = bytes per vector (must divide d)")
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(64, ge=8)
    train_per_list: int = Field(64, ge=39, description="training vectors per IVF cell (faiss needs >= 39)")
    max_train: int = Field(262_144, ge=1_000, description="upper bound on the training sample")
    nprobe: int | None = Field(None, ge=1, description="IVF cells probed per query (None: tune)")
    ef_search: int | None = Field(None, ge=1, description="HNSW search breadth (None: tune)")
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@10 the tuner aims for")
    tune_queries: int = Field(1000, ge=10, description="sample queries used to tune and report recall")
    search_batch: int = Field(8192, ge=1, description="queries per faiss call")
    chunk_rows: int = Field(65_536, ge=1, description="rows read from disk per chunk when adding")
    device: Device = "cpu"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> IndexConfig:
        if self.flat_max > self.ivf_max:
            raise ValueError(f"flat_max {self.flat_max} exceeds ivf_max {self.ivf_max}")
        return self


@dataclass(frozen=True)
class IndexPlan:
    """The index chosen for a collection, and why."""

    kind: str
    factory: str
    dim: int
    expected_rows: int
    metric: str
    nlist: int | None
    pq_m: int | None
    train_size: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def default_nlist(n: int) -> int:
    """``4 * sqrt(n)`` rounded to the nearest power of two, clamped to ``[16, 65536]``."""
    target = 4.0 * math.sqrt(max(n, 1))
    return int(min(65_536, max(16, 2 ** round(math.log2(target)))))


def default_pq_m(dim: int) -> int:
    """Largest ``m`` in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) dividing ``dim`` with at least 4 dims each."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


def _auto_kind(n: int, dim: int, cfg: IndexConfig, with_ids: bool) -> tuple[str, str]:
    raw_gb = 4.0 * n * dim / 2**30
    if n <= cfg.flat_max:
        return "flat", f"{n} <= flat_max {cfg.flat_max}: exact search"
    fits = n <= cfg.ivf_max and raw_gb <= cfg.memory_budget_gb
    if fits and n > cfg.fast_scan_min and not with_ids and dim % 4 == 0:
        return "ivf_pq_fs", (f"{n} vectors > fast_scan_min {cfg.fast_scan_min} ({raw_gb:.2f} GiB raw fit "
                             f"memory_budget_gb {cfg.memory_budget_gb}): IVF with 4-bit fast-scan PQ + exact "
                             f"re-ranking")
    if fits:
        return "ivf_flat", (f"{n} vectors ({raw_gb:.2f} GiB raw) fit memory_budget_gb {cfg.memory_budget_gb} "
                            f"and are <= ivf_max {cfg.ivf_max}: IVF-Flat")
    return "ivf_pq", f"{n} vectors ({raw_gb:.2f} GiB raw) exceed ivf_max or the memory budget: IVF-PQ"


def plan_index(n: int, dim: int, cfg: IndexConfig, *, with_ids: bool = False) -> IndexPlan:
    """Choose the index for ``n`` vectors of width ``dim``.

    Args:
        n: expected number of vectors.
        dim: vector width.
        cfg: the index configuration.
        with_ids: the index must take explicit ids and removals (rules out the fast-scan kind).

    Raises:
        ConfigError: impossible combination (e.g. ``pq_m`` that does not divide ``dim``).
    """
    if n < 1 or dim < 1:
        raise ConfigError(f"cannot plan an index for {n} vectors of width {dim}")
    kind, reason = _auto_kind(n, dim, cfg, with_ids) if cfg.kind == "auto" else (cfg.kind, "requested")
    if kind == "ivf_pq_fs" and (with_ids or dim % 4):
        raise ConfigError("the ivf_pq_fs index needs a width divisible by 4 and takes no explicit ids or removals"
                          f" (width {dim}, with_ids={with_ids}); use ivf_flat or ivf_pq")
    nlist = pq_m = None
    train = 0
    if kind == "flat":
        factory = "Flat"
    elif kind == "hnsw":
        factory = f"HNSW{cfg.hnsw_m},Flat"
    else:
        # Fast-scan lists are cheap to scan, so the coarse k-means (training and assigning every vector)
        # dominates its cost: half the cells of the other IVF kinds (measured at 1M x 384, docs/benchmarks.md).
        nlist = cfg.nlist or (default_nlist(n) // 2 if kind == "ivf_pq_fs" else default_nlist(n))
        # Never more cells than the data can fill with faiss's minimum of 39 training points each.
        nlist = max(1, min(nlist, n // 39)) if n >= 39 else 1
        train = min(n, cfg.max_train, max(cfg.train_per_list * nlist, 256 * 64))
        if kind == "ivf_flat":
            factory = f"IVF{nlist},Flat"
        elif kind == "ivf_pq_fs":
            pq_m = dim // 4  # 4 dimensions per 4-bit sub-quantiser: dim / 8 bytes per code
            factory = f"IVF{nlist},PQ{pq_m}x4fs,RFlat"
        else:
            pq_m = cfg.pq_m or default_pq_m(dim)
            if dim % pq_m:
                raise ConfigError(f"pq_m {pq_m} does not divide the vector width {dim}")
            # "np": no polysemous training (it reorders codes for Hamming pre-filtering, which we never use,
            # and costs minutes)
            factory = f"IVF{nlist},PQ{pq_m}x8np"
    return IndexPlan(kind=kind, factory=factory, dim=dim, expected_rows=n, metric=cfg.metric, nlist=nlist,
                     pq_m=pq_m, train_size=train, reason=reason)
