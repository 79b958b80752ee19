"""The contract between the generic :class:`~dinoforge.pretrain.trainer.Trainer` and the run it trains.

In the spirit of torchtitan's ``TrainSpec``: a run (DINOv2 pretraining, distillation) is a :class:`TrainSpec`
object, and the trainer calls nothing else of it. The trainer owns what every run shares: the process
runtime, the optimizer (:mod:`dinoforge.pretrain.optim`), precision, schedules, the loss-spike detector, the
training step (:func:`~dinoforge.pretrain.train_loop.train_step`), the loop, checkpoints with bit-exact resume,
rollback, SIGTERM handling, metrics and the progress bar. A spec provides:

==========================================  ============================================================
``cfg``                                     the resolved recipe (a :class:`RunConfig`: the shared sections)
``build(runtime)`` -> :class:`RunParts`     model build + parallelism, batches, extra checkpointed state
``check_resume(saved_config, state)``       refuse a checkpoint written by another kind of run / model
``indicators(batch, values, precision)``    run-specific health values added to each logged record
``collapse_warning(record)``                a warning about the logged record, or ``None``
``evaluate(step, periodic)``                k-NN (or any evaluation) on the main rank; ``None`` elsewhere
``export(step, last)``                      write the run's artifact(s); the path on the main rank
==========================================  ============================================================

Implementations: :class:`dinoforge.pretrain.pretrain_run.PretrainSpec` and
:class:`dinoforge.distill.trainer.DistillSpec`. The building blocks a run may assemble (data pipeline,
DINOv2 objective, parallelism, monitors) are exposed by :mod:`dinoforge.pretrain.blocks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from dinoforge.core.errors import ConfigError
from dinoforge.core.runtime import Runtime
from dinoforge.pretrain.config import CheckpointConfig, DataConfig, KnnConfig, MonitorConfig, TrainConfig
from dinoforge.pretrain.data import PretrainBatches
from dinoforge.pretrain.optim import OptimConfig
from dinoforge.pretrain.schedules import ScheduleConfig
from dinoforge.pretrain.spikes import SpikeConfig
from dinoforge.pretrain.train_loop import Precision, StepModel, StepResult

__all__ = ["Precision", "RunConfig", "RunParts", "StepModel", "StepResult", "TrainSpec", "check_unchanged",
           "knn_enabled"]


class RunConfig(Protocol):
    """The recipe sections the trainer reads (``PretrainConfig`` and ``DistillConfig`` both have them)."""

    run_dir: str
    seed: int
    data: DataConfig
    schedule: ScheduleConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    monitor: MonitorConfig
    knn: KnnConfig
    spike: SpikeConfig

    def global_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]:
        """The recipe as a plain dict (pydantic)."""
        ...


@dataclass
class RunParts:
    """What :meth:`TrainSpec.build` returns: everything the trainer trains, steps and checkpoints.

    Attributes:
        model: what the training step drives (``forward_backward`` / ``clip_gradients``; possibly DDP/FSDP
            wrapped inside); also an ``nn.Module`` whose ``train()`` the trainer calls.
        student: the *unwrapped* trainable sub-modules (optimizer groups, EMA source, checkpoint ``student``).
        teacher: the *unwrapped* EMA sub-modules, same keys (EMA target, checkpoint ``teacher``).
        state: further modules whose ``state_dict`` the checkpoint stores (the teacher centres).
        batches: the deterministic data stream: ``batches[data_step]`` is this rank's micro-batches.
        extra: facts recorded in the checkpoint's progress (``check_resume`` reads them back).
    """

    model: StepModel
    student: nn.ModuleDict
    teacher: nn.ModuleDict
    state: nn.Module
    batches: PretrainBatches
    extra: dict[str, Any] = field(default_factory=dict)


class TrainSpec(Protocol):
    """What a run plugs into the trainer (see the module docstring)."""

    cfg: RunConfig

    def build(self, runtime: Runtime) -> RunParts:
        """Build model(s), parallelism and batches on ``runtime`` (called once, on every rank)."""
        ...

    def check_resume(self, saved_config: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """Raise :class:`~dinoforge.core.errors.ConfigError` if this run cannot continue the checkpoint ``state``
        (written with the recipe ``saved_config``); the trainer checks seed, data source and schedule itself."""
        ...

    def indicators(self, batch: dict, values: Mapping[str, float], precision: Precision) -> dict[str, float]:
        """Health values of the last step (``batch``: its first micro-batch) for the logged record."""
        ...

    def collapse_warning(self, record: Mapping[str, Any]) -> str | None:
        """A collapse warning about a logged record (the trainer ignores it during the first epoch)."""
        ...

    def evaluate(self, step: int, *, periodic: bool) -> dict[str, float] | None:
        """Evaluation metrics (a collective: every rank calls it; the main rank returns them)."""
        ...

    def export(self, step: int, last: Mapping[str, Any]) -> Path | None:
        """Write the artifact(s) of the current weights (a collective); ``last``: the latest logged record."""
        ...


def check_unchanged(saved: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str], *, run_dir: str | Path,
                    hint: str = "use a new run_dir") -> None:
    """Refuse to resume when a recipe entry (dotted ``keys``, e.g. ``data.source``) changed since the checkpoint.

    Raises:
        ConfigError: naming the first changed key and ``hint``.
    """
    for dotted in keys:
        if _dig(saved, dotted) != _dig(now, dotted):
            raise ConfigError(f"cannot resume {run_dir}: '{dotted}' changed since its checkpoints were written "
                              f"({hint})")


def knn_enabled(cfg: KnnConfig) -> bool:
    """Whether a recipe asks for any k-NN evaluation (periodic, at the start or at the end)."""
    return bool(cfg.every_steps or cfg.at_end or cfg.at_start)


def _dig(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree
