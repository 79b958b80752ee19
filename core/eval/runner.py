"""End-to-end evaluations behind ``dinoforge eval``: open data, extract features, score, report.

Reports are plain JSON-ready dicts (task, model, data, preprocessing, per-pooling results, skipped samples,
timings, environment) so that stages can store them in artifact provenance or benchmark pages unchanged.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dinoforge.core import __version__
from dinoforge.core.data import DataSource, open_source
from dinoforge.core.errors import DataError
from dinoforge.core.eval.features import FeatureSet, extract_features
from dinoforge.core.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, check_knn_settings, knn_classify
from dinoforge.core.eval.linear import LinearProbeConfig, linear_probe
from dinoforge.core.eval.model import EvalModel
from dinoforge.core.eval.retrieval import DEFAULT_RECALL_KS, retrieval_recall
from dinoforge.core.fileio import atomic_write_json


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every report."""
    return {"dinoforge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def open_pair(first: str | DataSource, second: str | DataSource) -> tuple[DataSource, DataSource]:
    """Open two sources; the second reuses the first's class names so label indices agree."""
    a = open_source(first)
    b = open_source(second, classes=a.classes) if a.classes is not None and not isinstance(second, DataSource) \
        else open_source(second)
    return a, b


def _features(model: EvalModel, source: DataSource, *, batch_size: int, num_workers: int, progress: bool,
              desc: str) -> FeatureSet:
    return extract_features(model.extractor, source, preprocess=model.preprocess, batch_size=batch_size,
                            num_workers=num_workers, progress=progress, desc=desc)


def _device(model: EvalModel) -> torch.device:
    # Score on the device the features were computed on (k-NN similarity blocks and the probe are matmuls).
    return getattr(model.extractor, "device", torch.device("cpu"))


def _data_entry(source: DataSource, feats: FeatureSet) -> dict[str, Any]:
    return {"spec": source.spec, "samples": len(feats), "classes": source.classes,
            "skipped": feats.stats.to_dict(), "feature_seconds": round(feats.seconds, 3)}


def _report(task: str, model: EvalModel, parts: dict[str, Any], results: dict[str, Any],
            settings: dict[str, Any], started: float) -> dict[str, Any]:
    return {"task": task, "model": model.describe(), **parts,
            "preprocessing": model.preprocess.model_dump(mode="json"), "settings": settings, "results": results,
            "total_seconds": round(time.perf_counter() - started, 3), "environment": environment(),
            "command": sys.argv}


def run_knn(model: EvalModel, train: str | DataSource, test: str | DataSource | None, *,
            ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 256,
            num_workers: int = 0, chunk_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """k-NN accuracy of ``model``'s features (every pooling it computes) trained on ``train``, tested on ``test``
    (``test=None``: leave-one-out on ``train``, each image classified by all the others)."""
    check_knn_settings(ks, temperature)
    started = time.perf_counter()
    loo = test is None
    train_src, test_src = (open_source(train), None) if test is None else open_pair(train, test)
    kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    train_f = _features(model, train_src, desc=f"train {train_src.spec}", **kw)
    test_f = train_f if test_src is None else _features(model, test_src, desc=f"test {test_src.spec}", **kw)
    num_classes = train_src.num_classes
    results = {}
    for name in train_f.names:
        t0 = time.perf_counter()
        res = knn_classify(train_f[name], train_f.labels, test_f[name], test_f.labels, ks=ks,
                           temperature=temperature, num_classes=num_classes, chunk_size=chunk_size,
                           device=_device(model), leave_one_out=loo)
        results[name] = {**res.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    parts = {"train": _data_entry(train_src, train_f)}
    if test_src is not None:  # leave-one-out: the settings say so, there is no separate test set
        parts["test"] = _data_entry(test_src, test_f)
    return _report("knn", model, parts, results, {"ks": list(ks), "temperature": temperature,
                                                   "batch_size": batch_size, "leave_one_out": loo}, started)


def run_linear(model: EvalModel, train: str | DataSource, test: str | DataSource, *,
               config: LinearProbeConfig | None = None, batch_size: int = 256, num_workers: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """Linear-probe accuracy of ``model``'s features (every pooling it computes)."""
    started = time.perf_counter()
    cfg = config or LinearProbeConfig()
    train_src, test_src = open_pair(train, test)
    kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    train_f = _features(model, train_src, desc=f"train {train_src.spec}", **kw)
    test_f = _features(model, test_src, desc=f"test {test_src.spec}", **kw)
    results = {name: linear_probe(train_f[name], train_f.labels, test_f[name], test_f.labels, config=cfg,
                                  num_classes=train_src.num_classes, device=_device(model)).to_dict()
               for name in train_f.names}
    parts = {"train": _data_entry(train_src, train_f), "test": _data_entry(test_src, test_f)}
    return _report("linear", model, parts, results, {**cfg.model_dump(mode="json"), "batch_size": batch_size},
                   started)


def run_retrieval(model: EvalModel, query: str | DataSource, gallery: str | DataSource, *,
                  ks: Sequence[int] = DEFAULT_RECALL_KS, match: str = "label", batch_size: int = 256,
                  num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Recall@k of ``query`` against ``gallery``; relevance by equal ``label`` or equal ``id``.

    With ``match="label"`` and the same spec for both sides, each query's own entry is excluded.
    """
    if match not in ("label", "id"):
        raise DataError(f"retrieval match must be 'label' or 'id', got {match!r}")
    started = time.perf_counter()
    q_src, g_src = open_pair(query, gallery)
    kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    q_f = _features(model, q_src, desc=f"query {q_src.spec}", **kw)
    g_f = _features(model, g_src, desc=f"gallery {g_src.spec}", **kw)
    if match == "label":
        if (q_f.labels < 0).any() or (g_f.labels < 0).any():
            raise DataError("retrieval with --match label needs labelled query and gallery samples")
        q_keys, g_keys = q_f.labels, g_f.labels
    else:
        q_keys, g_keys = q_f.ids, g_f.ids
    same = q_src.spec == g_src.spec
    ids = {"query_ids": q_f.ids, "gallery_ids": g_f.ids} if same and match == "label" else {}
    results = {name: retrieval_recall(q_f[name], g_f[name], q_keys, g_keys, ks=ks, device=_device(model),
                                      **ids).to_dict()
               for name in q_f.names}
    parts = {"query": _data_entry(q_src, q_f), "gallery": _data_entry(g_src, g_f)}
    return _report("retrieval", model, parts, results, {"ks": list(ks), "match": match,
                                                         "exclude_self": bool(ids)}, started)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a report as JSON atomically."""
    atomic_write_json(path, report)
    return Path(path)
