"""``dinoforge curate``: embed -> self-dedup -> relative dedup -> retrieval -> balancing -> manifest.

Every step reads the files of the steps before it and writes its own (see each module), then a marker with
its fingerprint (:mod:`.state`); a rerun skips finished steps and resumes an interrupted one. Launched with
``torchrun``, the embedding step and every index search are split over the ranks (units and query chunks),
while the cheap global steps (union-find, k-means, balancing, manifest) run on rank 0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dinoforge.core.config import save_config
from dinoforge.core.index import SubsetVectors
from dinoforge.core.runtime import Runtime, init_runtime, require_shared_dir, shutdown_runtime
from dinoforge.curate import dedup, relative
from dinoforge.curate.config import CurateConfig
from dinoforge.curate.embed import Embeddings, run_embed
from dinoforge.curate.retrieval import cluster_retrieval, sample_retrieval
from dinoforge.curate.search import PoolIndex, build_or_load
from dinoforge.curate.state import RunState, fingerprint
from dinoforge.curate.steps import run_balance, run_manifest, selection

log = logging.getLogger("dinoforge.curate")


class _Run:
    """One execution of a recipe: state, embeddings and the reports of the steps."""

    def __init__(self, cfg: CurateConfig, info: Runtime) -> None:
        self.cfg, self.info = cfg, info
        self.state = RunState(cfg.output, info)
        self.emb = Embeddings(self.state, cfg)
        self.reports: dict[str, Any] = {}
        self.feature = cfg.embed.feature

    def step(self, name: str, fp: str, fn: Any) -> None:
        """Run ``fn()`` unless ``name`` already finished with fingerprint ``fp``."""
        if self.state.is_done(name, fp):
            log.info("%s: done already (fingerprint %s)", name, fp)
            self.reports[name] = self.state.report(name)
            return
        started = time.perf_counter()
        if name != "embed":
            self.state.begin(name, fp)
        report = fn() or {}
        report["wall_seconds"] = round(time.perf_counter() - started, 3)
        self.reports[name] = report
        self.state.mark_done(name, fp, report)

    # ------------------------------------------------------------------ steps 2-4
    def dedup_index(self) -> PoolIndex:
        unique = self._unique_rows()
        pool = self.emb.pool("dedup")
        index, _ = build_or_load(self.state.root / "dedup" / "index", SubsetVectors(pool.vectors(self.feature),
                                 unique), unique, self.cfg.dedup.index, self.info)
        return index

    def _unique_rows(self) -> np.ndarray:
        pool = self.emb.pool("dedup")
        table = pool.table(["content_hash"])
        _, exact_rows = dedup.exact_groups(table["content_hash"].to_pylist()) if self.cfg.dedup.exact else \
            (None, np.zeros(0, np.int64))
        return np.setdiff1d(np.arange(pool.num_rows, dtype=np.int64), exact_rows, assume_unique=True)

    def retrieve(self, candidates: np.ndarray) -> dict[str, Any]:
        cfg, seeds = self.cfg, {n: self.emb.seeds(n) for n in self.cfg.seeds}
        report: dict[str, Any] = {"candidates": int(candidates.size)}
        if cfg.retrieval.sample.enabled:
            if self.emb.shared and cfg.dedup.enabled and cfg.dedup.near:  # reuse the dedup index, filtered
                index = self.dedup_index()
                allowed, report["index"] = index.allowed(candidates), "reused the self-dedup index"
            else:
                pool = self.emb.pool("retrieval")
                tune = next(iter(seeds.values())).load(self.feature)[:cfg.retrieval.index.tune_queries]
                index, report["index"] = build_or_load(self.state.root / "retrieval" / "index", SubsetVectors(
                    pool.vectors(self.feature), candidates), candidates, cfg.retrieval.index, self.info,
                    tune_queries=tune)
                allowed = None
            report["sample"] = sample_retrieval(self.state, index, seeds, self.feature, allowed,
                                                cfg.retrieval.sample.k, cfg.dedup.chunk_rows)
        if cfg.retrieval.cluster.enabled and self.info.is_main:
            report["cluster"] = cluster_retrieval(self.state, self.emb.pool("retrieval"), seeds, self.feature,
                                                  candidates, cfg.retrieval.cluster, cfg.seed)
        return report

    # ------------------------------------------------------------------ the whole run
    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        if self.info.is_main:
            save_config(cfg, st.path("config.yaml"))
        models = self.emb.keys()
        fp = fingerprint("embed", cfg.embed, models, cfg.pool, cfg.seeds, cfg.eval_sets, cfg.dedup.enabled)
        self.step("embed", fp, lambda: run_embed(st, cfg, self.emb))
        n = self.emb.pool("retrieval").num_rows
        removed_self = np.zeros(0, np.int64)
        if cfg.dedup.enabled:
            fp = fingerprint(fp, "dedup", cfg.dedup)
            self.step("dedup", fp, lambda: dedup.run_self_dedup(st, self.emb.pool("dedup"), self.emb.dedup_feature,
                                                                 cfg.dedup))
            removed_self = st.removed_rows("dedup")
        kept = np.setdiff1d(np.arange(n, dtype=np.int64), removed_self, assume_unique=True)
        removed_rel = np.zeros(0, np.int64)
        if cfg.eval_sets:
            fp = fingerprint(fp, "relative", cfg.relative)
            evals = {name: self.emb.eval_set(name) for name in cfg.eval_sets}
            self.step("relative", fp, lambda: relative.run_relative_dedup(
                st, self.emb.pool("dedup"), self.emb.dedup_feature, evals, kept, cfg.relative, cfg.dedup.chunk_rows))
            removed_rel = st.removed_rows("relative")
        candidates = np.setdiff1d(kept, removed_rel, assume_unique=True)
        if cfg.seeds:
            fp = fingerprint(fp, "retrieval", cfg.retrieval, cfg.seed)
            self.step("retrieval", fp, lambda: self.retrieve(candidates))
        selected = selection(st, cfg, candidates) if self.info.is_main else None
        if cfg.balance.enabled:
            fp = fingerprint(fp, "balance", cfg.balance, cfg.seed)
            rows = np.sort(selected["pool_row"].to_numpy(np.int64)) if selected is not None else None
            self.step("balance", fp, lambda: run_balance(st, self.emb.pool("retrieval"), self.feature, rows,
                                                          cfg.balance, cfg.seed) if self.info.is_main else {})
        fp = fingerprint(fp, "manifest", cfg.manifest)
        seeds = {n: self.emb.seeds(n) for n in cfg.seeds}
        self.step("manifest", fp, lambda: run_manifest(st, cfg, self.emb.pool("retrieval"), seeds, selected,
                                                       dict(self.reports)) if self.info.is_main else {})
        return self.reports.get("manifest", {}) if self.info.is_main else {}


def run_curation(cfg: CurateConfig) -> dict[str, Any]:
    """Run (or resume) a curation recipe; returns the final report (rank 0; other ranks get ``{}``)."""
    info = init_runtime(cfg.embed.device)
    try:
        require_shared_dir(info, Path(cfg.output), "output")  # several nodes: ranks write chunks rank 0 merges
        return _Run(cfg, info).run()
    finally:
        shutdown_runtime(info)
