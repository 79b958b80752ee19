"""Step 1 — embed the pool, the seed sets and the evaluation sets with the batch extraction engine.

Every set is a ``dinoforge extract`` job (float16 ``.npy`` shards, memory-mappable, plus ``index.parquet``
mapping rows to ids and paths) under ``embed/<role>-<name>-<model hash>/``, so a rerun resumes the
extraction where it stopped and a different model never mixes with the old features. Under ``torchrun`` each
rank extracts its own units.

Which model embeds what: the retrieval model (``embed.model``) embeds the pool and the seed sets; the
copy-detection model (``dedup.model``, default the same) embeds the pool again when it differs, and the
evaluation sets (relative deduplication compares copies, as DINOv2 did with its copy-detection descriptor).
``dedup.model: copy`` names the shipped copy descriptor (:class:`~.copynet.CopyDescriptor`, the one
``dinoforge dedup`` uses), ``copy:HEAD.npz`` another head of ``dinoforge copy-head``; its vectors are stored
as the ``cls`` feature.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dinoforge.core.artifact import is_artifact, read_card
from dinoforge.core.errors import CheckpointError, DataError
from dinoforge.core.extract import ExtractConfig, ExternalModel, FeatureStore, run_extraction
from dinoforge.core.fileio import sha256_file
from dinoforge.curate.config import COPY_MODEL, FEATURES_SCHEME, CurateConfig, is_copy_model
from dinoforge.curate.copynet import COPY_FEATURE, DEFAULT_HEAD, CopyDescriptor, load_head
from dinoforge.curate.state import RunState

log = logging.getLogger("dinoforge.curate")


def copy_head(model: str) -> Path | None:
    """The head file a ``copy`` / ``copy:HEAD.npz`` model names, ``None`` for any other model."""
    if not is_copy_model(model):
        return None
    return DEFAULT_HEAD if model == COPY_MODEL else Path(model[len(COPY_MODEL) + 1:]).expanduser()


def model_key(model: str) -> str:
    """First 12 hex digits of the model's weights hash (artifact card, the checkpoint file's SHA-256, or a copy
    head file's SHA-256)."""
    if model == "pixels":
        return "pixels"
    head = copy_head(model)
    if head is not None:
        load_head(head)  # a missing or malformed head is a clear error before any embedding starts
        return sha256_file(head)[:12]
    path = Path(model).expanduser()
    if is_artifact(path):
        return read_card(path).weights_sha256[:12]
    if path.is_file():
        return sha256_file(path)[:12]
    raise CheckpointError(f"model {model} is neither an artifact directory nor a checkpoint file")


def store_key(path: str | Path) -> str:
    """Model key of a precomputed store (first 12 characters of its recorded model fingerprint)."""
    return str(FeatureStore(path).model_sha256 or "external")[:12]


class Embeddings:
    """Where every set's features live (the stores are opened lazily, after the step ran).

    A set given as ``features:/path`` is a precomputed extraction output, used as it is.
    """

    def __init__(self, state: RunState, cfg: CurateConfig) -> None:
        self.state, self.cfg = state, cfg
        self.retrieval_model = cfg.embed.model
        self.dedup_model = cfg.dedup.model or cfg.embed.model
        self.shared = self.dedup_model == self.retrieval_model or \
            model_key(str(self.dedup_model)) == model_key(str(self.retrieval_model))
        #: feature the dedup and relative steps read: a copy descriptor's vectors are its COPY_FEATURE
        self.dedup_feature = COPY_FEATURE if copy_head(str(self.dedup_model)) is not None else cfg.embed.feature

    def keys(self) -> dict[str, str]:
        """Model keys of the retrieval and dedup embeddings (what the steps' fingerprints depend on)."""
        if self.cfg.pool.startswith(FEATURES_SCHEME):
            key = store_key(self.cfg.pool[len(FEATURES_SCHEME):])
            return {"retrieval": key, "dedup": key}
        return {"retrieval": model_key(str(self.retrieval_model)), "dedup": model_key(str(self.dedup_model))}

    def _dir(self, role: str, name: str, spec: str, model: str | None) -> Path:
        if spec.startswith(FEATURES_SCHEME):
            return Path(spec[len(FEATURES_SCHEME):])
        return self.state.root / "embed" / f"{role}-{name}-{model_key(str(model))}"

    def jobs(self) -> list[tuple[str, Path, str]]:
        """``(spec, output folder, model)`` of every extraction the run needs, in order."""
        cfg = self.cfg
        jobs = [(cfg.pool, self.pool_dir("retrieval"), self.retrieval_model)]
        if not self.shared and cfg.dedup.enabled:
            jobs.append((cfg.pool, self.pool_dir("dedup"), self.dedup_model))
        jobs += [(spec, self._dir("seeds", name, spec, self.retrieval_model), self.retrieval_model)
                 for name, spec in cfg.seeds.items()]
        jobs += [(spec, self._dir("eval", name, spec, self.dedup_model), self.dedup_model)
                 for name, spec in cfg.eval_sets.items()]
        return [(s, d, str(m)) for s, d, m in jobs if not s.startswith(FEATURES_SCHEME)]

    def pool_dir(self, purpose: str) -> Path:
        """Pool features for ``retrieval`` or ``dedup``."""
        if purpose == "dedup" and not self.shared:
            return self._dir("pool", "dedup", self.cfg.pool, self.dedup_model)
        return self._dir("pool", "retrieval", self.cfg.pool, self.retrieval_model)

    def pool(self, purpose: str = "retrieval") -> FeatureStore:
        """The pool's feature store for ``retrieval`` or ``dedup``."""
        return FeatureStore(self.pool_dir(purpose))

    def seeds(self, name: str) -> FeatureStore:
        """A seed set's feature store."""
        return FeatureStore(self._dir("seeds", name, self.cfg.seeds[name], self.retrieval_model))

    def eval_set(self, name: str) -> FeatureStore:
        """An evaluation set's feature store (copy-detection model)."""
        return FeatureStore(self._dir("eval", name, self.cfg.eval_sets[name], self.dedup_model))


def run_embed(state: RunState, cfg: CurateConfig, emb: Embeddings) -> dict[str, object]:
    """Run (or resume) every extraction job; returns rows and skipped inputs per set."""
    e = cfg.embed
    report: dict[str, object] = {}
    copy_models: dict[Path, ExternalModel] = {}  # the backbone is loaded once for the pool and every eval set
    for spec, out, model in emb.jobs():
        head = copy_head(model)
        if head is not None and head not in copy_models:
            copy_models[head] = CopyDescriptor(head, batch_size=e.batch_size).extraction_model()
        external = copy_models[head] if head is not None else None
        job = ExtractConfig(model=model, input=spec, output=str(out), shard_size=e.shard_size,
                            features=(COPY_FEATURE,) if head else (e.feature,), dtype="float16", format="npy",
                            preprocess=() if head else e.preprocess, batch_size=e.batch_size,
                            num_workers=e.num_workers, device=e.device, autocast=e.autocast,
                            progress=state.info.is_main)
        log.info("embed %s with %s -> %s", spec, model, out.name)
        result = run_extraction(job, external)
        if not result.complete:
            raise RuntimeError(f"extraction into {out} did not complete")
        store = FeatureStore(out)
        report[out.name] = {"spec": spec, "rows": store.num_rows, "bad": store.bad().num_rows}
    for name, spec in [("pool", cfg.pool), *cfg.seeds.items(), *cfg.eval_sets.items()]:
        if spec.startswith(FEATURES_SCHEME):
            store = FeatureStore(spec[len(FEATURES_SCHEME):])  # validates that the store is complete
            if store.model_sha256 and emb.keys()["retrieval"] != str(store.model_sha256)[:12]:
                raise DataError(f"{spec} was embedded by model {store.model_sha256}, the pool by another one")
            report[name] = {"spec": spec, "rows": store.num_rows, "precomputed": True}
    return report
