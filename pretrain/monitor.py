"""Watching a run: JSONL metrics, optional TensorBoard, a progress bar, and collapse indicators.

Collapse indicators (computed every ``log_every`` steps on the current global crops, with the teacher):

* ``teacher_entropy``: mean per-image entropy of the teacher's normalised CLS distribution / ``log K``.
  Near 1 = *uniform* collapse (the teacher says nothing); near 0 with a low ``teacher_batch_entropy`` =
  *dominant-prototype* collapse.
* ``teacher_batch_entropy``: entropy of the batch-averaged teacher distribution / ``log K`` (how many
  prototypes are in use; low = everything maps to a few prototypes).
* ``feature_std``: per-dimension standard deviation over the batch of L2-normalised teacher CLS features,
  averaged over dimensions and scaled by ``sqrt(D)`` (about 1 for isotropic features, 0 when every image
  has the same embedding).
* ``center_norm``: L2 norm of the DINO centre (centering mode).
* ``koleo``: the logged KoLeo term of the step (from the loss dict).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dinoforge.core.fileio import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def collapse_indicators(logits: torch.Tensor, features: torch.Tensor, *, teacher_temp: float,
                        center: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse indicators from teacher outputs.

    Args:
        logits: teacher DINO-head logits ``[n, K]``.
        features: teacher CLS features (post-norm, pre-head) ``[n, D]``.
        teacher_temp: temperature of the softmax.
        center: DINO centre ``[1, K]`` subtracted before the softmax (centering mode), or ``None``.
    """
    logits = logits.float()
    k = logits.shape[-1]
    shifted = logits - center.float() if center is not None else logits
    logp = F.log_softmax(shifted / teacher_temp, dim=-1)  # [n, K]
    p = logp.exp()
    entropy = -(p * logp).sum(-1).mean() / math.log(k)
    mean_p = p.mean(0)  # [K]
    batch_entropy = -(mean_p * mean_p.clamp_min(1e-30).log()).sum() / math.log(k)
    feats = F.normalize(features.float(), dim=-1)
    std = feats.std(0, unbiased=False).mean() * math.sqrt(feats.shape[-1]) if len(feats) > 1 else torch.tensor(0.0)
    out = {"teacher_entropy": float(entropy), "teacher_batch_entropy": float(batch_entropy),
           "feature_std": float(std)}
    if center is not None:
        out["center_norm"] = float(center.float().norm())
    return out


def collapse_warning(ind: dict[str, float], *, min_feature_std: float, max_entropy: float) -> str | None:
    """A message when the indicators say the representation collapsed, else ``None``."""
    if ind.get("feature_std", 1.0) < min_feature_std:
        return (f"features collapsed: teacher CLS feature std {ind['feature_std']:.4f} < {min_feature_std} "
                "(every image gets nearly the same embedding)")
    if ind.get("teacher_entropy", 0.0) > max_entropy:
        return (f"teacher output is uniform: normalised entropy {ind['teacher_entropy']:.4f} > {max_entropy} "
                "(uniform collapse; lower the teacher temperature or check the centering)")
    return None


class MetricsLog:
    """Append-only JSONL metrics (one object per logged step) plus optional TensorBoard scalars.

    Only the process that owns the log (rank 0) should create one.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.path = run_dir / METRICS_FILE
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                from dinoforge.core.errors import MissingDependencyError

                raise MissingDependencyError("monitor.tensorboard needs the tensorboard package "
                                             "(pip install 'dinoforge[monitor]')") from err
            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps ``> step`` (a resumed run redoes them); rewrites the file atomically."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``)."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed run: drop it


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (torn lines skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Progress:
    """tqdm bar over training steps showing loss terms and throughput (disabled off rank 0 or when asked)."""

    def __init__(self, *, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain")

    def update(self, steps: int, postfix: dict[str, float]) -> None:
        """Advance the bar and show ``postfix`` (short keys, formatted to 4 significant digits)."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(steps)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
