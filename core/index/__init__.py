"""The faiss index layer: size-based index choice, streamed training/adding, batched search, recall checks.

Used by curation (deduplication and retrieval over pools that do not fit in memory) and by the serving
layer's retrieval endpoints for large indexes. Cosine similarity (inner product on L2-normalised vectors)
is the default metric.
"""

from dinoforge.core.index.config import IndexConfig, IndexPlan, default_nlist, plan_index
from dinoforge.core.index.exact import RecallReport, exact_search, recall_at_k
from dinoforge.core.index.index import VectorIndex, faiss_device, gpu_available
from dinoforge.core.index.tune import measure_recall, tune_index
from dinoforge.core.index.vectors import (ArrayVectors, ShardedVectors, SubsetVectors, VectorSource, l2_normalize,
                                          sample_rows)

__all__ = ["ArrayVectors", "IndexConfig", "IndexPlan", "RecallReport", "ShardedVectors", "SubsetVectors", "VectorIndex",
           "VectorSource", "default_nlist", "exact_search", "faiss_device", "gpu_available", "l2_normalize",
           "measure_recall", "plan_index", "recall_at_k", "sample_rows", "tune_index"]
