"""Batch feature extraction: sharded, resumable, multi-process (``dinoforge extract``).

The curation embed step runs through the same engine and reads the result with :class:`FeatureStore`.
"""

from dinoforge.core.extract.config import FEATURES, ExtractConfig
from dinoforge.core.extract.external import write_feature_store
from dinoforge.core.extract.engine import ExtractResult, FeatureComputer, run_extraction
from dinoforge.core.extract.plan import Unit, plan_units
from dinoforge.core.extract.store import FeatureStore, finalize

__all__ = ["FEATURES", "ExtractConfig", "ExtractResult", "FeatureComputer", "FeatureStore", "Unit", "finalize",
           "plan_units", "run_extraction", "write_feature_store"]
