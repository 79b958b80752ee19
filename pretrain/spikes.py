"""Loss-spike detection with a skip or rollback policy.

A step's total loss is a *spike* when it is not finite, or when it exceeds ``factor`` times the median of
the last ``window`` accepted losses (once ``min_history`` of them exist). The median is robust to the spikes
themselves and follows the slow downward drift of a healthy run. Policies:

* ``off``: no detection;
* ``warn``: log the spike, apply the update anyway;
* ``skip``: drop the update (no optimizer step, no teacher EMA, no centre change is undone: the centre is
  an EMA of teacher statistics, unaffected by the bad student step) and go on with the next batch;
* ``rollback``: restore the last checkpoint and continue past the batches that led to the spike (the data
  stream is shifted by the number of steps replayed, so the same batches are not fed again; PaLM-style).

``max_consecutive`` spikes in a row stop the run with an error: the run has diverged and needs a human.
Skipped and rolled-back steps are counted in the metrics (``spikes_skipped``, ``rollbacks``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from dinoforge.core.config import StrictModel
from dinoforge.core.errors import DinoforgeError


class TrainingDivergedError(DinoforgeError):
    """Too many consecutive loss spikes (or non-finite losses): the run cannot continue on its own."""


class SpikeConfig(StrictModel):
    """Loss-spike policy (see the module docstring)."""

    policy: Literal["off", "warn", "skip", "rollback"] = "skip"
    factor: float = Field(3.0, gt=1.0, description="spike when loss > factor * median of the window")
    window: int = Field(50, ge=3)
    min_history: int = Field(20, ge=1)
    max_consecutive: int = Field(10, ge=1)


class SpikeDetector:
    """Running-median spike detector; its state is saved in checkpoints (:meth:`state_dict`)."""

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = 0
        self.total = 0

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` is a spike; updates the history with accepted losses."""
        if self.cfg.policy == "off":
            return False
        spike = not math.isfinite(loss)
        if not spike and len(self.history) >= self.cfg.min_history:
            ordered = sorted(self.history)
            median = ordered[len(ordered) // 2]
            spike = loss > self.cfg.factor * median
        if spike:
            self.consecutive += 1
            self.total += 1
            if self.consecutive >= self.cfg.max_consecutive:
                raise TrainingDivergedError(
                    f"{self.consecutive} consecutive loss spikes (last loss {loss:.4g}); the run diverged. "
                    "Lower the learning rate, enable train.frozen_patch_embed or raise spike.factor")
        else:
            self.consecutive = 0
            self.history.append(loss)
        return spike

    def state_dict(self) -> dict[str, object]:
        """History and counters."""
        return {"history": list(self.history), "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.history = deque((float(v) for v in state["history"]), maxlen=self.cfg.window)
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
