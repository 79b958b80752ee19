"""Retrieval recall@k: for each query, is a relevant gallery item among its k most similar (cosine)?"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dinoforge.core.errors import DataError

DEFAULT_RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalResult:
    """Recall@k in percent; ``n_without_match`` queries had no relevant item in the gallery at all."""

    ks: tuple[int, ...]
    recall: dict[int, float]
    n_queries: int
    n_gallery: int
    n_without_match: int

    def to_dict(self) -> dict:
        """JSON-ready (integer keys become strings)."""
        out = asdict(self)
        out["recall"] = {str(k): v for k, v in self.recall.items()}
        out["ks"] = list(self.ks)
        return out


def _codes(query_keys: Sequence[Hashable] | torch.Tensor,
           gallery_keys: Sequence[Hashable] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary hashable keys onto shared integer codes."""
    q = query_keys.tolist() if isinstance(query_keys, torch.Tensor) else list(query_keys)
    g = gallery_keys.tolist() if isinstance(gallery_keys, torch.Tensor) else list(gallery_keys)
    table: dict[Hashable, int] = {}
    encode = [table.setdefault(key, len(table)) for key in g + q]
    return torch.tensor(encode[len(g):], dtype=torch.int64), torch.tensor(encode[:len(g)], dtype=torch.int64)


def retrieval_recall(query_x: torch.Tensor, gallery_x: torch.Tensor,
                     query_keys: Sequence[Hashable] | torch.Tensor, gallery_keys: Sequence[Hashable] | torch.Tensor,
                     *, ks: Sequence[int] = DEFAULT_RECALL_KS, query_ids: Sequence[str] | None = None,
                     gallery_ids: Sequence[str] | None = None, chunk_size: int = 1024,
                     device: str | torch.device | None = None) -> RetrievalResult:
    """Recall@k of cosine retrieval.

    Args:
        query_x: ``[Q, D]``; gallery_x: ``[G, D]``.
        query_keys, gallery_keys: relevance keys (labels, image ids, ...): relevant means equal keys.
        ks: cut-offs.
        query_ids, gallery_ids: when both are given, a gallery item with the query's own id is never
            retrieved (evaluating a set against itself).
        chunk_size: queries per similarity block; device: where to compute.
    """
    if query_x.dim() != 2 or gallery_x.dim() != 2 or query_x.shape[1] != gallery_x.shape[1]:
        raise DataError(f"retrieval needs [Q, D] and [G, D] features, got {list(query_x.shape)}, "
                        f"{list(gallery_x.shape)}")
    if len(query_keys) != len(query_x) or len(gallery_keys) != len(gallery_x):
        raise DataError("retrieval: features and keys have different lengths")
    if not ks or min(ks) <= 0:
        raise DataError(f"recall cut-offs must be positive, got {list(ks)}")
    device = torch.device(device) if device is not None else query_x.device
    q_codes, g_codes = (c.to(device) for c in _codes(query_keys, gallery_keys))
    ids = None
    if query_ids is not None and gallery_ids is not None:
        q_ids, g_ids = _codes(list(query_ids), list(gallery_ids))
        ids = q_ids.to(device), g_ids.to(device)
    gallery = F.normalize(gallery_x.to(device, torch.float32), dim=1)  # [G, D]
    max_k = min(max(ks), len(gallery))
    hits = {int(k): 0 for k in ks}
    without = 0
    for start in range(0, len(query_x), chunk_size):
        stop = start + chunk_size
        sims = F.normalize(query_x[start:stop].to(device, torch.float32), dim=1) @ gallery.T  # [m, G]
        relevant = q_codes[start:stop, None] == g_codes[None, :]  # [m, G]
        if ids is not None:
            same_id = ids[0][start:stop, None] == ids[1][None, :]  # [m, G]
            sims.masked_fill_(same_id, float("-inf"))
            relevant &= ~same_id
        without += int((~relevant.any(dim=1)).sum())
        top = sims.topk(max_k, dim=1).indices  # [m, K]
        found = relevant.gather(1, top)  # [m, K]
        for k in hits:
            hits[k] += int(found[:, :k].any(dim=1).sum())
    n = len(query_x)
    return RetrievalResult(ks=tuple(hits), recall={k: 100.0 * h / n for k, h in hits.items()}, n_queries=n,
                           n_gallery=len(gallery), n_without_match=without)
