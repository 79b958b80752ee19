"""Evaluation of frozen features: k-NN (DINOv2 protocol), linear probe, retrieval recall@k.

See ``docs/core.md`` ("Evaluation"). ``dinoforge eval`` is defined in :mod:`.commands`.

Names are resolved lazily (PEP 562): ``dinoforge --help`` imports :mod:`.commands`, and with it this package,
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static names for type checkers and IDEs; at run time __getattr__ imports on first use
    from dinoforge.core.eval.features import (BackboneExtractor, FeatureExtractor, FeatureSet, PixelExtractor,
                                              autocast_context, extract_features, image_to_features)
    from dinoforge.core.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, KnnResult, knn_class_scores, knn_classify
    from dinoforge.core.eval.linear import LinearProbeConfig, LinearProbeResult, linear_probe, train_linear_grid
    from dinoforge.core.eval.model import PIXEL_CONTRACT, EvalModel, load_eval_model
    from dinoforge.core.eval.report import format_report
    from dinoforge.core.eval.retrieval import RetrievalResult, retrieval_recall
    from dinoforge.core.eval.runner import environment, open_pair, run_knn, run_linear, run_retrieval, write_report

_EXPORTS = {
    "features": ("BackboneExtractor", "FeatureExtractor", "FeatureSet", "PixelExtractor", "autocast_context",
                 "extract_features", "image_to_features"),
    "knn": ("DEFAULT_KS", "DEFAULT_TEMPERATURE", "KnnResult", "check_knn_settings", "knn_class_scores",
            "knn_classify"),
    "linear": ("LinearProbeConfig", "LinearProbeResult", "linear_probe", "train_linear_grid"),
    "model": ("PIXEL_CONTRACT", "EvalModel", "load_eval_model"),
    "report": ("format_report",),
    "retrieval": ("RetrievalResult", "retrieval_recall"),
    "runner": ("environment", "open_pair", "run_knn", "run_linear", "run_retrieval", "write_report"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
