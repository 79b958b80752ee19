"""``dinoforge distill eval``: teacher, students, their ONNX exports and raw pixels on the same k-NN protocols.

Protocols (k = 20, T = 0.07, cosine, the DINOv2 weighted vote; :mod:`dinoforge.core.eval.knn`):

* ``tuxpaint``: the seven Tux Paint categories (422 stamps on white, 224 px; ``tuxpaint:eval``),
  leave-one-out (each stamp classified by the other 421);
* ``fmnist``: Fashion-MNIST train -> test (full 60k / 10k by default).

Every model is scored with its own preprocessing contract: students with their artifact's, ONNX exports with
the card they carry, the external teacher at its ``preprocess`` size and normalisation, raw pixels at 32 px
(tuxpaint) and 28 px (Fashion-MNIST, its native size). The teacher is rebuilt from the run's ``config.yaml``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dinoforge.core.artifact import read_card
from dinoforge.core.errors import ConfigError
from dinoforge.core.eval.model import PIXEL_CONTRACT, EvalModel, load_eval_model
from dinoforge.core.eval.runner import run_knn
from dinoforge.core.fileio import atomic_write_json
from dinoforge.core.onnx_contract import CLS_OUTPUT, MEAN_OUTPUT
from dinoforge.core.ort_session import create_session
from dinoforge.core.pooling import pool
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.distill.config import DistillConfig, TeacherConfig
from dinoforge.distill.external_teacher import ExternalTeacher, ViewNorm
from dinoforge.distill.teacher import load_teacher

K, TEMPERATURE = 20, 0.07
TUXPAINT = "tuxpaint:eval"
PROTOCOLS = ("tuxpaint", "fmnist")


class TeacherExtractor:
    """Pooled features ``{"cls": [B, D]}`` of an external teacher on its own preprocessed images."""

    def __init__(self, teacher: ExternalTeacher) -> None:
        self.teacher = teacher

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.teacher.embed(pixels)}


class OnnxExtractor:
    """``{pooling: [B, D']}`` from an exported graph's class and mean outputs (onnxruntime, CPU)."""

    def __init__(self, graph: Path, pooling: str = "cls") -> None:
        self.session = create_session(graph)
        self.input_name = self.session.get_inputs()[0].name
        self.pooling = pooling

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, mean = self.session.run([CLS_OUTPUT, MEAN_OUTPUT], {self.input_name: pixels.float().numpy()})
        return {self.pooling: torch.from_numpy(pool(np.asarray(cls), np.asarray(mean), self.pooling))}


def teacher_eval_model(cfg: TeacherConfig) -> EvalModel:
    """An external teacher as an evaluation model: resize to ``preprocess.size``, its own mean/std."""
    pre = cfg.preprocess
    teacher, info = load_teacher(cfg, ViewNorm(pre.mean, pre.std, pre.size))  # views already teacher-ready
    if not isinstance(teacher, ExternalTeacher):
        raise ConfigError("teacher_eval_model is for torchvision / timm / onnx teachers; evaluate artifacts "
                          "with dinoforge eval knn --model")
    contract = PreprocessConfig(mode="resize", size=pre.size, resize_size=None, mean=pre.mean, std=pre.std,
                                patch_size=1)
    return EvalModel(TeacherExtractor(teacher), contract, f"teacher {info.kind}", "checkpoint", info.sha256,
                     info.path)


def onnx_eval_model(folder: Path) -> EvalModel:
    """An ONNX export directory (``dinoforge export onnx``) with the preprocessing of the card it carries."""
    graphs = sorted(folder.glob("model_*.onnx"))
    if not graphs:
        raise ConfigError(f"{folder} holds no exported graph (model_*.onnx)")
    card = read_card(folder)
    return EvalModel(OnnxExtractor(graphs[0], card.default_pooling), card.preprocessing, f"{card.name} onnx:{folder.name}", "checkpoint",
                     None, str(graphs[0]))


def _score(model: EvalModel, protocol: str, fmnist: tuple[str, str], batch_size: int) -> dict[str, Any]:
    train, test = (TUXPAINT, None) if protocol == "tuxpaint" else fmnist
    report = run_knn(model, train, test, ks=[K], temperature=TEMPERATURE, batch_size=batch_size, progress=False)
    result = next(iter(report["results"].values()))  # every model here computes exactly one pooling
    return {"top1": result["top1"][str(K)], "n_train": result["n_train"], "n_test": result["n_test"],
            "seconds": report["total_seconds"]}


def _pixels(protocol: str) -> EvalModel:
    size = 32 if protocol == "tuxpaint" else 28
    model = load_eval_model("pixels")
    model.preprocess = PIXEL_CONTRACT.model_copy(update={"size": size})
    return model


def evaluate_models(models: dict[str, EvalModel | None], *, protocols: Sequence[str] = PROTOCOLS,
                    fmnist: tuple[str, str] = ("fmnist:train", "fmnist:test"),
                    batch_size: int = 128) -> dict[str, dict[str, Any]]:
    """``{model name: {protocol: {top1, n_train, n_test, seconds}}}``; ``None`` stands for raw pixels."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"unknown protocols {unknown}; known: {', '.join(PROTOCOLS)}")
    table: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        table[name] = {p: _score(model if model is not None else _pixels(p), p, fmnist, batch_size) for p in protocols}
    return table


def run_models(run_dir: Path, *, teacher: bool, pixels: bool, onnx: Sequence[Path], artifacts: Sequence[Path] = (),
               artifact_poolings: Sequence[str] = ()) -> dict[str, EvalModel | None]:
    """The models of a distillation run: teacher (optional), every student artifact, ONNX exports, pixels, and
    other artifacts to compare with (a pretraining run's, say), each under its card's pooling or under every
    pooling of ``artifact_poolings``."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a distillation run directory (no config.yaml)")
    cfg = DistillConfig.model_validate(yaml.safe_load(config.read_text()))
    models: dict[str, EvalModel | None] = {}
    if teacher:
        models["teacher"] = teacher_eval_model(cfg.teacher) if cfg.teacher.kind != "artifact" else \
            load_eval_model(str(cfg.teacher.path))
    for student in cfg.students:
        art = run_dir / "artifacts" / student.name
        if art.is_dir():  # scored by the vector its card promises (what serving returns)
            models[student.name] = load_eval_model(art, poolings=(read_card(art).default_pooling,))
    for folder in onnx:
        models[f"onnx:{folder.name}"] = onnx_eval_model(folder)
    for art in artifacts:
        for pooling in artifact_poolings or (read_card(art).default_pooling,):
            models[f"{art} ({pooling})"] = load_eval_model(art, poolings=(pooling,))
    if pixels:
        models["raw pixels"] = None
    return models


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per model, top-1 per protocol."""
    protocols = sorted({p for row in table.values() for p in row}, key=PROTOCOLS.index)
    lines = ["| model | " + " | ".join(f"{p} k-NN top-1" for p in protocols) + " |",
             "|---|" + "---:|" * len(protocols)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[p]['top1']:.2f}" if p in row else "-" for p in protocols)
                     + " |")
    return "\n".join(lines)


def write_table(table: dict[str, dict[str, Any]], path: Path) -> None:
    """The table as JSON (atomically), with the protocol settings."""
    atomic_write_json(path, {"k": K, "temperature": TEMPERATURE, "results": table})


def load_table(path: Path) -> dict[str, dict[str, Any]]:
    """A table written by :func:`write_table`."""
    return json.loads(path.read_text())["results"]
