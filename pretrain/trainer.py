"""The generic trainer: the loop, checkpoints and resume around a :class:`~dinoforge.pretrain.spec.TrainSpec`.

``Trainer(spec).run()`` works identically on one CPU process, one GPU and under ``torchrun`` (DDP or FSDP2);
``dinoforge pretrain`` runs ``Trainer(PretrainSpec(cfg))`` (:mod:`dinoforge.pretrain.pretrain_run`) and
``dinoforge distill`` runs ``Trainer(DistillSpec(cfg))``. A run directory holds ``config.yaml`` (resolved
recipe), ``metrics.jsonl``, ``checkpoints/step_*.ckpt``, what the spec exports (pretraining: ``artifact/``)
and ``plots/`` (``dinoforge plot``).

Re-running the same command on a run directory continues from its newest good checkpoint; on CPU the
continuation is bit-exact (same parameters as an uninterrupted run), because every source of randomness is
either a function of the step (crops, masks, sampling) or saved in the checkpoint (RNG states, optimizer,
centres, spike detector).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from dinoforge.core.config import config_to_yaml, save_config
from dinoforge.core.errors import CheckpointError
from dinoforge.core.hostmem import set_mmap_threshold
from dinoforge.core.runtime import Runtime, init_runtime, require_shared_dir, shutdown_runtime
from dinoforge.pretrain.checkpointing import load_latest
from dinoforge.pretrain.data import batch_loader
from dinoforge.pretrain.monitor import MetricsLog, Progress as ProgressBar
from dinoforge.pretrain.optim import build_optimizer
from dinoforge.pretrain.schedules import build_schedules
from dinoforge.pretrain.spec import TrainSpec, check_unchanged
from dinoforge.pretrain.spikes import SpikeDetector
from dinoforge.pretrain.train_loop import StepResult, make_precision, move_batch, train_step
from dinoforge.pretrain.train_state import CheckpointWriter, Progress, restore_state

log = logging.getLogger("dinoforge.pretrain")
_IMMUTABLE_ON_RESUME = ("seed", "data.source", "schedule")  # the spec adds its own (model, crops ...)


@dataclass
class RunResult:
    """Summary of a finished (or stopped) run."""

    run_dir: Path
    steps: int
    artifact: Path | None
    last_metrics: dict[str, Any]
    stopped_early: bool


class Trainer:
    """The generic training loop around a :class:`~dinoforge.pretrain.spec.TrainSpec`.

    Args:
        spec: the run (``PretrainSpec(cfg)``, ``DistillSpec(cfg)``); the trainer calls only its interface.
        runtime: where this process runs (default: from the environment; joins torchrun's group).
    """

    def __init__(self, spec: TrainSpec, runtime: Runtime | None = None) -> None:
        self.spec = spec
        self.cfg = cfg = spec.cfg
        self.rt = runtime or init_runtime(cfg.train.device, threads=cfg.train.threads)
        set_mmap_threshold(cfg.train.host_mmap_threshold_mib)  # before the model: its buffers follow the rule
        if not self.rt.is_main:  # one voice: other ranks only report errors
            logging.getLogger("dinoforge").setLevel(logging.ERROR)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress = Progress()
        self._stop = False
        self.parts = spec.build(self.rt)
        self.progress.extra.update(self.parts.extra)
        self.optimizer = build_optimizer(self.parts.student, cfg.optim)
        self.precision = make_precision(cfg.train.precision, self.rt.device)
        self.global_batch = cfg.global_batch_size(self.rt.world_size)
        self.schedules = build_schedules(cfg.schedule, global_batch_size=self.global_batch)
        self.total_steps = cfg.schedule.epochs * cfg.schedule.epoch_length
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.detector = SpikeDetector(cfg.spike)
        ck = cfg.checkpoint
        self.checkpoints = CheckpointWriter(self.ckpt_dir, fmt=ck.format, async_save=ck.async_save, keep=ck.keep)
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.monitor.tensorboard) if self.rt.is_main else None

    # ------------------------------------------------------------------ resume
    def _check_compatible(self, state: dict[str, Any]) -> None:
        saved = yaml.safe_load(state["config_yaml"])
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.run_dir}: the checkpoint's recipe is not a mapping")
        self.spec.check_resume(saved, state)
        check_unchanged(saved, self.cfg.model_dump(mode="json"), _IMMUTABLE_ON_RESUME, run_dir=self.run_dir)
        saved_world = int(state.get("world_size", 1))
        if saved["data"]["batch_size"] * saved["data"]["grad_accum"] * saved_world != self.global_batch:
            log.warning("global batch differs from the checkpoint's: the data stream continues from the same "
                        "step but steps now hold %d images", self.global_batch)

    def _resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        found = load_latest(self.ckpt_dir)
        if found is None:
            return
        if found.state.get("format") != "dinoforge-pretrain" or "config_yaml" not in found.state:
            raise CheckpointError(f"{found.path} is not a dinoforge pretraining checkpoint")
        self._check_compatible(found.state)
        self._restore(found.state)
        if self.metrics is not None:
            self.metrics.truncate_after(self.progress.step)
        log.info("resumed from %s at step %d", found.path, self.progress.step)

    def _restore(self, state: dict[str, Any]) -> None:
        restore_state(state, student=self.parts.student, teacher=self.parts.teacher, centres=self.parts.state,
                      optimizer=self.optimizer, scaler=self.precision.scaler, progress=self.progress,
                      rank=self.rt.rank, world_size=self.rt.world_size)
        self.detector.load_state_dict(state["spikes"])

    def _save(self) -> None:
        self.checkpoints.save(self.progress.step, student=self.parts.student, teacher=self.parts.teacher,
                              centres=self.parts.state, optimizer=self.optimizer, scaler=self.precision.scaler,
                              progress=self.progress, spikes=self.detector.state_dict(),
                              config_yaml=self._config_yaml())
        _barrier()

    def _config_yaml(self) -> str:
        return config_to_yaml(self.cfg)

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunResult:
        """Train to the end (or ``max_steps`` / ``max_minutes`` / SIGTERM), then checkpoint and export."""
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        # Several nodes train one run: rank 0's checkpoints must be the ones every rank resumes from.
        require_shared_dir(self.rt, self.run_dir, "run_dir")
        self._resume()
        if self.cfg.knn.at_start and self.progress.step == 0:
            self._knn_record()
        self.parts.model.train()
        previous = signal.signal(signal.SIGTERM, self._request_stop) if _main_thread() else None
        bar = ProgressBar(total=self.total_steps, initial=self.progress.step,
                          enabled=self.rt.is_main and self.cfg.monitor.progress)
        last: dict[str, Any] = {}
        try:
            last = self._loop(bar)
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        artifact = self._finish(last)
        stopped = self.progress.step < self.total_steps
        if self.metrics is not None:
            self.metrics.close()
        shutdown_runtime(self.rt)
        return RunResult(self.run_dir, self.progress.step, artifact, last, stopped)

    def _loop(self, bar: ProgressBar) -> dict[str, Any]:
        last: dict[str, Any] = {}
        window_start, window_images = time.perf_counter(), 0
        started = time.perf_counter()
        budget = self.cfg.train.max_minutes * 60 if self.cfg.train.max_minutes else None
        loader = self._loader()
        while self.progress.step < self.total_steps:
            step_start = time.perf_counter()
            micro = [move_batch(b, self.rt.device) for b in next(loader)]
            values = self.schedules.at(self.progress.step)
            result = train_step(self.parts.model, micro, values=values, optimizer=self.optimizer,
                                precision=self.precision, clip_grad=self.cfg.optim.clip_grad, detector=self.detector,
                                student=self.parts.student, teacher=self.parts.teacher, device=self.rt.device)
            if result.spike and self.cfg.spike.policy == "rollback" and self._rollback(micro[0]["data_step"]):
                loader = self._loader()
                continue
            self._advance(result)
            self.progress.train_seconds += time.perf_counter() - step_start
            window_images += self.global_batch
            if self.progress.step % self.cfg.monitor.log_every == 0 or self.progress.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                last = self._log(result, values, micro[0], window_images / max(elapsed, 1e-9))
                window_start, window_images = time.perf_counter(), 0
            bar.update(1, {"loss": result.losses["total"], **({"img/s": last["img_per_s"]} if last else {})})
            self._periodic(last)
            if budget is not None and time.perf_counter() - started > budget:
                log.info("train.max_minutes reached at step %d", self.progress.step)
                break
            if _any_rank(self._stop, self.rt.device):
                log.warning("stop requested (SIGTERM): checkpointing at step %d", self.progress.step)
                break
        return last

    def _loader(self) -> Iterator[list[dict]]:
        start = self.progress.data_step
        return iter(batch_loader(self.parts.batches, start=start, stop=start + self.total_steps - self.progress.step + 1,
                                 num_workers=self.cfg.data.num_workers))

    def _advance(self, result: StepResult) -> None:
        self.progress.step += 1
        if result.applied:
            self.progress.images_seen += self.global_batch
        else:
            self.progress.skipped_steps += 1
            log.warning("loss spike at step %d (loss %.4g): update skipped", self.progress.step,
                        result.losses["total"])

    def _rollback(self, spike_data_step: int) -> bool:
        self.checkpoints.wait()  # a background save must be complete to be rolled back to
        found = load_latest(self.ckpt_dir)
        if found is None:
            log.warning("loss spike but no checkpoint to roll back to: skipping the update instead")
            return False
        rollbacks, consecutive, total = self.progress.rollbacks + 1, self.detector.consecutive, self.detector.total
        self._restore(found.state)
        # Spike counters survive the rollback, so repeated spikes still end in TrainingDivergedError.
        self.progress.rollbacks, self.detector.consecutive, self.detector.total = rollbacks, consecutive, total
        self.progress.data_offset = spike_data_step + 1 - self.progress.step
        log.warning("loss spike: rolled back to step %d; data resumes after batch %d", self.progress.step,
                    spike_data_step)
        return True

    def _periodic(self, last: dict[str, Any]) -> None:
        step, ck = self.progress.step, self.cfg.checkpoint
        if step % ck.every_steps == 0 and step < self.total_steps:
            self._save()
        if ck.artifact_every_steps and step % ck.artifact_every_steps == 0 and step < self.total_steps:
            self._export(last)
        knn_every = self.cfg.knn.every_steps
        if knn_every and step % knn_every == 0 and step < self.total_steps:
            self._knn_record(periodic=True)

    def _finish(self, last: dict[str, Any]) -> Path | None:
        self._save()
        self.checkpoints.wait()
        if self.cfg.knn.at_end:
            knn = self._knn_record()
            last.update(knn or {})
        return self._export(last)

    # ------------------------------------------------------------------ monitoring and export
    def _log(self, result: StepResult, values: dict[str, float], batch: dict, img_per_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.progress.step,
                                  "epoch": self.progress.step / self.cfg.schedule.epoch_length, **values}
        record.update({("total_loss" if k == "total" else k): v for k, v in result.losses.items()})
        record.update({f"grad_norm_{k}": v for k, v in result.grad_norms.items()})
        record.update(self.spec.indicators(batch, values, self.precision))
        record.update({"img_per_s": img_per_s, "images_seen": self.progress.images_seen,
                       "spikes_skipped": self.progress.skipped_steps, "rollbacks": self.progress.rollbacks,
                       "train_seconds": self.progress.train_seconds})
        warning = self.spec.collapse_warning(record)
        if warning and self.progress.step >= self.cfg.schedule.epoch_length:
            log.warning("step %d: %s", self.progress.step, warning)
            record["collapse_warning"] = warning
        if self.metrics is not None:
            self.metrics.write(record)
        return record

    def _knn_record(self, *, periodic: bool = False) -> dict[str, float] | None:
        out = self.spec.evaluate(self.progress.step, periodic=periodic)
        if out is not None and self.metrics is not None:
            self.metrics.write({"step": self.progress.step, **out})
        _barrier()
        return out

    def _export(self, last: dict[str, Any]) -> Path | None:
        path = self.spec.export(self.progress.step, last)
        _barrier()
        return path

    def _request_stop(self, *_: object) -> None:
        self._stop = True


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
