"""Periodic k-NN of the teacher during pretraining (core evaluation, DINOv2 protocol).

The labelled train/test sources are opened once; each evaluation extracts teacher features with the
artifact's preprocessing contract and runs weighted k-NN (:func:`dinoforge.core.eval.knn.knn_classify`).
"""

from __future__ import annotations

import logging
import time

from dinoforge.core.data import DataSource, open_source
from dinoforge.core.eval.features import BackboneExtractor, extract_features
from dinoforge.core.eval.knn import knn_classify
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.pretrain.config import KnnConfig
from dinoforge.pretrain.teacher_export import PlainTeacher

log = logging.getLogger(__name__)


class KnnMonitor:
    """Runs k-NN of a teacher on fixed labelled subsets.

    Args:
        cfg: which sets, k and temperature.
        preprocess: evaluation preprocessing (the artifact's contract).
        device: where features are extracted.
    """

    def __init__(self, cfg: KnnConfig, preprocess: PreprocessConfig, *, device: str = "cpu") -> None:
        self.cfg, self.preprocess, self.device = cfg, preprocess, device
        self._sources: dict[str, DataSource] = {}
        self._open(cfg.train), self._open(cfg.test)  # fail early on a bad spec
        if cfg.periodic_train:
            self._open(cfg.periodic_train)
        if cfg.periodic_test:
            self._open(cfg.periodic_test)

    def _open(self, spec: str) -> DataSource:
        if spec not in self._sources:
            self._sources[spec] = open_source(spec)
        return self._sources[spec]

    def evaluate(self, teacher: PlainTeacher, *, periodic: bool = False) -> dict[str, float]:
        """``knn_top1`` / ``knn_top5`` (percent) and the seconds it took.

        Args:
            teacher: the model to evaluate.
            periodic: use the (smaller) periodic sets when configured.
        """
        cfg = self.cfg
        train = self._open(cfg.periodic_train or cfg.train) if periodic else self._open(cfg.train)
        test = self._open(cfg.periodic_test or cfg.test) if periodic else self._open(cfg.test)
        start = time.perf_counter()
        extractor = BackboneExtractor(teacher.backbone, (cfg.pooling,), device=self.device)
        feats = [extract_features(extractor, src, preprocess=self.preprocess, batch_size=cfg.batch_size,
                                  progress=False) for src in (train, test)]
        result = knn_classify(feats[0][cfg.pooling], feats[0].labels, feats[1][cfg.pooling], feats[1].labels,
                              ks=(cfg.k,), temperature=cfg.temperature)
        out = {"knn_top1": result.top1[cfg.k], "knn_top5": result.top5[cfg.k], "knn_n_train": result.n_train,
               "knn_n_test": result.n_test, "knn_seconds": time.perf_counter() - start}
        log.info("k-NN (k=%d, %d train / %d test): top-1 %.2f%%", cfg.k, result.n_train, result.n_test,
                 out["knn_top1"])
        return out
