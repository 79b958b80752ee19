"""Batch feature extraction: sharded, resumable, multi-process (``dinoforge extract``).

The curation embed step runs through the same engine and reads the result with :class:`FeatureStore`.

Names are resolved on first use (PEP 562) so that ``dinoforge --help``, which imports :mod:`.commands` and
therefore this package, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinoforge.core.extract.config import FEATURES, ExtractConfig
    from dinoforge.core.extract.engine import ExternalModel, ExtractResult, FeatureComputer, run_extraction
    from dinoforge.core.extract.external import write_feature_store
    from dinoforge.core.extract.plan import Unit, plan_units
    from dinoforge.core.extract.store import FeatureStore, finalize

_WHERE = {
    "FEATURES": "config", "ExtractConfig": "config", "ExtractResult": "engine", "ExternalModel": "engine",
    "FeatureComputer": "engine",
    "run_extraction": "engine", "write_feature_store": "external", "Unit": "plan", "plan_units": "plan",
    "FeatureStore": "store", "finalize": "store",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
