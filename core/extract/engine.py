"""The batch extraction engine behind ``dinoforge extract`` (and the curation embed step).

``run_extraction(config)``: open the model and the input, plan the units, claim (or resume) the output
folder, then run this rank's missing units: workers decode and preprocess, the main process runs the model
and streams features into each unit's staging directory, which is renamed into place when the unit is
complete. When every unit is done, rank 0 merges the per-unit tables (``index.parquet``, ``bad.parquet``).

A killed job restarted with the same arguments skips the finished units and redoes the rest, so every input
ends up in the output exactly once.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from dinoforge.core.data import DataSource, IndexedSource, SkipStats, WebDatasetSource, open_source
from dinoforge.core.errors import ConfigError
from dinoforge.core.eval.features import autocast_context
from dinoforge.core.eval.model import load_eval_model
from dinoforge.core.extract.config import ExtractConfig
from dinoforge.core.extract.loading import UnitBatch, indexed_loader, tar_loader
from dinoforge.core.extract.plan import (SHARDS_DIR, Unit, check_claim, claim_output, done_units, job_spec,
                                         plan_units, remove_stale_staging, units_of_rank)
from dinoforge.core.extract.store import finalize
from dinoforge.core.extract.writer import UnitWriter
from dinoforge.core.fileio import atomic_directory
from dinoforge.core.pooling import pool
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.core.runtime import Runtime, barrier, init_runtime, require_shared_dir, shutdown_runtime

log = logging.getLogger("dinoforge.extract")
#: pixels ``[B, 3, H, W]`` -> ``{feature: [B, ...]}`` float32 numpy
Compute = Callable[[torch.Tensor], dict[str, np.ndarray]]


@dataclass
class ExtractResult:
    """What a run did (this rank's work; ``complete`` says whether the whole job is finished)."""

    output: Path
    units_total: int
    units_done_now: int
    rows_now: int
    bad_now: int
    seconds: float
    complete: bool
    summary: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        """Inputs (good and bad) handled per second by this run."""
        return (self.rows_now + self.bad_now) / self.seconds if self.seconds > 0 else 0.0


class FeatureComputer:
    """Backbone forward pass -> the requested features as numpy arrays.

    Args:
        backbone: a ``DinoVisionTransformer`` (eval mode, on ``device``).
        features: names from :data:`~dinoforge.core.extract.config.FEATURES`.
        device: torch device of the backbone.
        autocast: ``bf16``/``fp16`` mixed precision or ``None``.
    """

    def __init__(self, backbone: torch.nn.Module, features: tuple[str, ...], device: torch.device,
                 autocast: str | None) -> None:
        self.backbone, self.features, self.device, self.autocast = backbone, features, device, autocast

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """pixels ``[B, 3, H, W]`` -> ``{name: [B, D] | [B, 2D] | [B, N, D]}`` float32 numpy."""
        with torch.inference_mode(), autocast_context(self.device, self.autocast):
            out = self.backbone.forward_dino(pixels.to(self.device, non_blocking=True))
        cls_token = out["x_norm_clstoken"].float()  # [B, D]
        patches = out["x_norm_patchtokens"].float()  # [B, N, D]
        patch_mean = patches.mean(dim=1)  # [B, D]
        return {name: (patches if name == "patch" else pool(cls_token, patch_mean, name)).cpu().numpy()
                for name in self.features}


@dataclass(frozen=True)
class ExternalModel:
    """A model opened by the caller (e.g. a serving backend running an ONNX graph) instead of ``config.model``.

    Attributes:
        preprocess: the contract the loader workers prepare images with.
        sha256: identity of the weights (part of the job spec, so a resume with other weights is refused).
        embed_dim: token width ``D``.
        compute: pixels ``[B, 3, H, W]`` -> ``{feature: [B, ...]}`` float32 numpy, for ``config.features``.
    """

    preprocess: PreprocessConfig
    sha256: str
    embed_dim: int
    compute: Compute
    kind: str = "external"


class PixelComputer:
    """The raw-pixel baseline: preprocessed pixels ``[B, 3, H, W]`` -> ``{"pixels": [B, 3*H*W]}``."""

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        return {"pixels": pixels.flatten(1).float().numpy()}


class _OpenUnit:
    """A unit being written: its staging directory stays open until the unit's last batch has arrived."""

    def __init__(self, out_dir: Path, unit: Unit, config: ExtractConfig) -> None:
        self.unit = unit
        self._cm = atomic_directory(out_dir / SHARDS_DIR / unit.name)
        staging = self._cm.__enter__()
        self.writer = UnitWriter(staging, part_rows=config.shard_size, fmt=config.format,
                                 dtype=np.dtype(config.dtype))
        self.started = time.perf_counter()

    def commit(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        summary = self.writer.close({"seconds": round(seconds, 3), "tar": self.unit.tar,
                                     "start": self.unit.start, "stop": self.unit.stop})
        self._cm.__exit__(None, None, None)
        return summary

    def abort(self, err: BaseException) -> None:
        try:
            self._cm.__exit__(type(err), err, err.__traceback__)
        except BaseException:  # noqa: BLE001 - the staging folder is gone; the original error is re-raised
            pass


def _loader(source: DataSource, units: list[Unit], model: Any, config: ExtractConfig) -> Any:
    kwargs = {"batch_size": config.batch_size, "num_workers": config.num_workers}
    if isinstance(source, IndexedSource):
        return indexed_loader(source, units, model.preprocess, **kwargs)
    # plan_units already refused every streaming source but a WebDataset (DataError)
    return tar_loader(cast(WebDatasetSource, source), units, model.preprocess, **kwargs)


def _consume(batch: UnitBatch, open_units: dict[int, _OpenUnit], by_index: dict[int, Unit], out_dir: Path,
             config: ExtractConfig, compute: Compute, stats: SkipStats) -> dict[str, Any] | None:
    unit = open_units.get(batch.unit)
    if unit is None:
        unit = open_units[batch.unit] = _OpenUnit(out_dir, by_index[batch.unit], config)
    if batch.pixels is not None:
        records = {"id": batch.ids, "path": batch.paths, "label": batch.labels, "source_index": batch.indices,
                   "content_hash": batch.hashes}
        unit.writer.append(compute(batch.pixels), records)
        stats.add_good(len(batch.ids))
    for bad in batch.bad:
        unit.writer.add_bad(bad.id, bad.path, bad.reason)
        stats.add_bad(bad, where=f"unit {unit.unit.name}")
    if not batch.last:
        return None
    del open_units[batch.unit]
    return unit.commit()


def _run_units(source: DataSource, units: list[Unit], model: Any, compute: Compute, out_dir: Path,
               config: ExtractConfig, info: Runtime) -> tuple[int, SkipStats]:
    stats = SkipStats()
    if not units:
        return 0, stats
    by_index = {u.index: u for u in units}
    open_units: dict[int, _OpenUnit] = {}
    total = sum(u.size or 0 for u in units) if isinstance(source, IndexedSource) else None
    bar = tqdm(total=total, unit="img", desc=f"extract[rank {info.rank}]" if info.world_size > 1 else "extract",
               disable=not config.progress or not info.is_main, dynamic_ncols=True, file=sys.stderr)
    committed = 0
    try:
        for batch in _loader(source, units, model, config):
            summary = _consume(batch, open_units, by_index, out_dir, config, compute, stats)
            bar.update(len(batch.ids) + len(batch.bad))
            if summary is not None:
                committed += 1
                log.debug("unit %d done: %d rows, %d bad", batch.unit, summary["rows"], summary["bad"])
    except BaseException as err:
        for unit in open_units.values():
            unit.abort(err)
        raise
    finally:
        bar.close()
    if open_units or committed != len(units):
        raise RuntimeError(f"extraction loader ended with {len(units) - committed} units unfinished")
    return committed, stats


def _open(config: ExtractConfig, info: Runtime, external: ExternalModel | None,
          opened: DataSource | None) -> tuple[Any, DataSource, list[Unit], dict[str, Any]]:
    device = info.device
    model: Any = external or load_eval_model(config.model, poolings=("cls",), device=device,
                                             autocast=config.autocast, preprocess_overrides=config.preprocess)
    if (model.kind == "pixels") != (config.features == ("pixels",)):
        raise ConfigError("the 'pixels' feature goes with --model pixels (and only with it)")
    source = opened if opened is not None else open_source(config.input)
    pre = model.preprocess
    if external is not None:
        dim = external.embed_dim
    else:
        dim = 3 * pre.size * pre.size if model.kind == "pixels" else model.extractor.backbone.config.embed_dim
    units = plan_units(source, config.shard_size)
    spec = job_spec(model_sha256=model.sha256, model=str(config.model), input_spec=source.spec,
                    features=config.features, dtype=config.dtype, fmt=config.format, shard_size=config.shard_size,
                    preprocess=model.preprocess.model_dump(mode="json"), units=units,
                    embed_dim=dim,
                    num_inputs=len(source) if isinstance(source, IndexedSource) else None)
    return model, source, units, spec


def run_extraction(config: ExtractConfig, external: ExternalModel | None = None,
                   source: DataSource | None = None) -> ExtractResult:
    """Run (or resume) an extraction job; returns what this run did.

    ``external``: a model opened by the caller, used instead of loading ``config.model`` (whose text then only
    names the job). ``source``: ``config.input`` already opened by the caller (e.g. wrapped to do more with
    each decoded image); its spec must be ``config.input``'s.

    Raises:
        DataError / ConfigError / ArtifactError / CheckpointError: bad input, or an output folder holding
            another job.
    """
    started = time.perf_counter()
    info = init_runtime(config.device)
    try:
        model, source, units, spec = _open(config, info, external, source)
        out_dir = Path(config.output)
        require_shared_dir(info, out_dir, "--output")  # several nodes: each writes units, rank 0 merges them
        if info.is_main:
            resumed = claim_output(out_dir, spec)
            if resumed:
                log.info("resuming extraction in %s", out_dir)
        barrier(info)
        if not info.is_main:
            check_claim(out_dir, spec)
        done = done_units(out_dir)
        mine = [u for u in units_of_rank(units, info.rank, info.world_size) if u.name not in done]
        mine = mine[:config.max_units] if config.max_units else mine
        remove_stale_staging(out_dir, mine)
        if external is not None:
            compute: Compute = external.compute
        elif model.kind == "pixels":
            compute = PixelComputer()
        else:
            compute = FeatureComputer(model.extractor.backbone, config.features, model.extractor.device,
                                      config.autocast)
        committed, stats = _run_units(source, mine, model, compute, out_dir, config, info)
        barrier(info)
        complete = len(done_units(out_dir)) == len(units)
        summary = finalize(out_dir) if complete and info.is_main else None
        barrier(info)
    finally:
        shutdown_runtime(info)
    return ExtractResult(output=out_dir, units_total=len(units), units_done_now=committed, rows_now=stats.good,
                         bad_now=stats.bad, seconds=time.perf_counter() - started, complete=complete,
                         summary=summary)
