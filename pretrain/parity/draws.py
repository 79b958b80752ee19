"""Replay of the official efficient-stochastic-depth row draws stored in a train-step fixture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class DrawMismatch(RuntimeError):
    """The model asked for a drop-path subset the fixture did not draw (order, group size or count)."""


class StoredDraws:
    """Replays the stored row subsets ``<prefix>/draw<q>/kept_indices`` in the official draw order.

    Installed as every student block's ``row_sampler``, it answers the blocks' requests for the rows to keep
    instead of drawing them, so a drop-path step becomes deterministic and comparable.
    """

    def __init__(self, fixture: Mapping[str, Any], prefix: str) -> None:
        n = int(fixture[f"{prefix}/num_droppath_draws"])
        self.draws = [(fixture[f"{prefix}/draw{q}/kept_indices"], int(fixture[f"{prefix}/draw{q}/group_batch"]))
                      for q in range(n)]
        self.used = 0

    def __call__(self, batch: int, keep: int, device: torch.device) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise DrawMismatch(f"the model asked for more than the {len(self.draws)} stored draws")
        kept, group_batch = self.draws[self.used]
        if (batch, keep) != (group_batch, kept.numel()):
            raise DrawMismatch(f"draw {self.used}: model wants {keep} of {batch} rows, fixture kept "
                               f"{kept.numel()} of {group_batch}")
        self.used += 1
        return kept.to(device)  # [keep]

    def install(self, student: Mapping[str, nn.Module]) -> StoredDraws:
        """Make every block of ``student["backbone"]`` draw from this replay."""
        for block in student["backbone"].blocks:
            block.row_sampler = self
        return self
