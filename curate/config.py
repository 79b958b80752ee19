"""The curation recipe (``dinoforge curate --config RECIPE.yaml``).

Thresholds are **cosine similarities** of L2-normalised embeddings, and a pair is a duplicate when its
similarity is **greater than or equal to** the threshold (as in DINOv2's description of LVD-142M, which
quotes similarity thresholds). "Within 0.45 of an evaluation image" therefore means cosine similarity
``>= 0.45``, i.e. cosine distance ``<= 0.55``. Suitable values depend on the embedding model: calibrate them
on injected copies (see :mod:`dinoforge.curate.copydetect`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.index import IndexConfig
from dinoforge.curate.linkage import Linkage

#: Spec prefix naming a precomputed embedding store (an extraction output) instead of images.
FEATURES_SCHEME = "features:"
#: ``dedup.model`` naming the shipped copy descriptor (``copy:HEAD.npz``: another head of dinoforge copy-head).
COPY_MODEL = "copy"


def is_copy_model(model: str | None) -> bool:
    """Whether ``model`` names a copy descriptor head (``copy`` or ``copy:HEAD.npz``)."""
    return model is not None and (model == COPY_MODEL or model.startswith(COPY_MODEL + ":"))


class EmbedConfig(StrictModel):
    """How pool, seed and evaluation images are embedded (through the batch extraction engine)."""

    model: str | None = Field(None, description="artifact (or checkpoint) used for retrieval and balancing; "
                                                 "may be omitted when every set is a features: spec")
    feature: Literal["cls", "mean", "cls+mean", "pixels"] = Field("cls", description="pixels: model 'pixels'")
    shard_size: int = Field(10_000, ge=1)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "cpu"
    autocast: Literal["bf16", "fp16"] | None = None
    preprocess: tuple[str, ...] = ()


class DedupConfig(StrictModel):
    """Self-deduplication of the pool: exact content hashes, then a k-NN graph and its components."""

    enabled: bool = True
    model: str | None = Field(None, description="copy-detection model (default: embed.model); 'copy': the shipped "
                              "copy descriptor of dinoforge dedup, 'copy:HEAD.npz' another head")
    exact: bool = Field(True, description="first drop pixel-identical images (content hash)")
    near: bool = Field(True, description="k-NN near-duplicate pass (false: exact pass only)")
    k: int = Field(64, ge=1, description="neighbours per image in the k-NN graph")
    threshold: float = Field(0.6, ge=-1.0, le=1.0, description="edge when cosine similarity >= threshold")
    linkage: Linkage = Field(
        "components", description="components: connected components of the edges (memory: one integer per "
        "image); kept: drop an image only when it is a near-duplicate of an earlier image that is kept (no "
        "chains; holds the edges in memory)")
    chunk_rows: int = Field(65_536, ge=1, description="query rows per search task (the unit ranks share)")
    index: IndexConfig = Field(default_factory=IndexConfig)


class RelativeDedupConfig(StrictModel):
    """Removal of pool images that (nearly) copy an evaluation image."""

    threshold: float = Field(0.45, ge=-1.0, le=1.0, description="drop when cosine similarity >= threshold")
    index: IndexConfig = Field(default_factory=lambda: IndexConfig(kind="flat"),
                               description="exact by default: no leak can slip through an approximate search")


class SampleRetrievalConfig(StrictModel):
    """The k nearest (kept) pool images of every seed image."""

    enabled: bool = True
    k: int = Field(4, ge=1)


class ClusterRetrievalConfig(StrictModel):
    """Pool k-means; clusters with enough seed hits contribute up to ``per_cluster`` images."""

    enabled: bool = False
    num_clusters: int = Field(1000, ge=2)
    min_seed_hits: int = Field(4, ge=1, description="a cluster is used when it holds more than 3 seeds (>= 4)")
    per_cluster: int = Field(100, ge=1, description="images taken from each used cluster (M)")
    max_per_seed_set: int | None = Field(None, ge=1, description="cap on images retrieved for one seed set")
    pick: Literal["random", "nearest"] = Field("random", description="which images of a cluster are taken")
    niter: int = Field(20, ge=1)


class RetrievalConfig(StrictModel):
    """Retrieval of pool images similar to the curated seed sets."""

    sample: SampleRetrievalConfig = Field(default_factory=SampleRetrievalConfig)
    cluster: ClusterRetrievalConfig = Field(default_factory=ClusterRetrievalConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)


class BalanceConfig(StrictModel):
    """Hierarchical k-means with resampling and top-down balanced sampling (optional)."""

    enabled: bool = False
    target_size: int = Field(10_000, ge=1)
    levels: tuple[int, ...] = Field((100, 10), description="clusters per level, finest first")
    resampling_steps: int = Field(2, ge=0)
    resample_size: int = Field(10, ge=1, description="points per cluster kept by a resampling step")
    niter: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check(self) -> BalanceConfig:
        if not self.levels or any(b > a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels must be non-empty and non-increasing (finest first), got {list(self.levels)}")
        return self


class ManifestConfig(StrictModel):
    """The curated manifest and the report."""

    format: Literal["csv", "parquet", "arrow"] = Field("csv", description="arrow: memory-mapped by pretraining "
                                                      "at scale (core/data/arrow_manifest.py)")
    plots: bool = True
    grid_seeds: int = Field(6, ge=0, description="seeds shown in the retrieval grid plot")


class CurateConfig(StrictModel):
    """A curation run: pool, seed sets, evaluation sets and the settings of every step."""

    output: str = Field(..., description="run directory (each step writes its files here; resumable)")
    pool: str = Field(..., description="data source spec of the uncurated pool (or features:STORE)")
    seeds: dict[str, str] = Field(default_factory=dict, description="seed set name -> data source spec")
    eval_sets: dict[str, str] = Field(default_factory=dict, description="evaluation set name -> data source spec")
    embed: EmbedConfig
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    relative: RelativeDedupConfig = Field(default_factory=RelativeDedupConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    manifest: ManifestConfig = Field(default_factory=ManifestConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> CurateConfig:
        specs = [self.pool, *self.seeds.values(), *self.eval_sets.values()]
        if self.embed.model is None and not all(s.startswith(FEATURES_SCHEME) for s in specs):
            raise ValueError("embed.model is required unless every set is a precomputed 'features:' store")
        if is_copy_model(self.embed.model):
            raise ValueError("embed.model cannot be the copy descriptor: it serves dedup.model only (copy detection, "
                             "not retrieval)")
        if self.pool.startswith(FEATURES_SCHEME) and self.dedup.model is not None:
            raise ValueError("dedup.model cannot re-embed a precomputed 'features:' pool; leave it unset")
        for name in [*self.seeds, *self.eval_sets]:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"set name {name!r} must be a non-empty file-name-safe word")
        return self
