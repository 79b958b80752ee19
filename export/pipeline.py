"""``dinoforge export onnx``: artifact -> one ONNX graph per resolution + parity report, atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx
import torch
from pydantic import Field

from dinoforge.core.artifact import Artifact, load_artifact
from dinoforge.core.config import StrictModel
from dinoforge.core.fileio import atomic_directory, atomic_write_json, sha256_file
from dinoforge.core.onnx_contract import (CARD_COPY, EMBEDDING_OUTPUTS, EXPORT_FORMAT_VERSION, MANIFEST_FILE,
                                          PARITY_FILE, PATCH_OUTPUT, graph_filename, parse_resolutions, resolution_tag)
from dinoforge.export.errors import ExportError, ParityFailure
from dinoforge.export.graph import ExportableViT
from dinoforge.export.onnx_export import (Exporter, export_metadata, export_module, io_names, save_model,
                                          set_metadata)
from dinoforge.export.parity import ParityThresholds, gate
from dinoforge.export.parity_data import (FMNIST_DEFAULT, ParityInputs, default_image_dir, load_fmnist_knn,
                                          load_images)
from dinoforge.export.parity_eval import evaluate_graph, graph_inputs
from dinoforge.export.quantize import Int8Scheme, quantize_graph

log = logging.getLogger(__name__)


class OnnxExportOptions(StrictModel):
    """Options of ``dinoforge export onnx`` (CLI flags map 1:1)."""

    resolutions: str | None = Field(None, description="'224,448' or '224x336'; default: the card's size")
    precision: str = Field("fp32", pattern="^(fp32|fp16|int8)$")
    embed_preprocessing: bool = False
    patch_tokens: bool = False
    opset: int = Field(18, ge=18)
    exporter: Exporter = "auto"
    calibration: Path | None = None
    calibration_limit: int = Field(64, gt=0)
    int8_scheme: Int8Scheme = Field("cpu", description="static uint8 (ORT CPU), static int8 symmetric (TRT), "
                                    "dynamic (ORT CPU, no calibration) or mixed (ORT CPU, conv stems)")
    parity_images: Path | None = None
    parity_limit: int = Field(100, gt=0)
    knn_data: Path | None = FMNIST_DEFAULT
    knn_limit: int = Field(500, ge=0)
    thresholds: ParityThresholds = Field(default_factory=ParityThresholds)
    overwrite: bool = False
    report: Path | None = Field(None, description="also write parity.json here (kept when parity fails)")


def _load_inputs(opts: OnnxExportOptions) -> ParityInputs:
    folder = opts.parity_images or default_image_dir()
    if folder is None:
        raise ExportError("no parity images: pass --parity-images DIR (the default, foolbox's sample images, "
                          "is not installed)")
    images = load_images(folder, opts.parity_limit)
    knn = None
    if opts.knn_data is not None and opts.knn_limit > 0:
        knn = load_fmnist_knn(opts.knn_data, opts.knn_limit)
    calibration = []
    if opts.precision == "int8" and opts.int8_scheme != "dynamic":
        if opts.calibration is None:
            raise ExportError("--precision int8 needs --calibration DIR (a folder of representative images)")
        calibration = load_images(opts.calibration, opts.calibration_limit)
    return ParityInputs(images, calibration, knn)


def _build_graph(art: Artifact, hw: tuple[int, int], opts: OnnxExportOptions, inputs: ParityInputs
                 ) -> tuple[ExportableViT, onnx.ModelProto, onnx.ModelProto | None, str]:
    """Export one resolution; for int8 also return the fp32 graph it was quantized from."""
    dtype = torch.float16 if opts.precision == "fp16" else torch.float32
    pre = art.card.preprocessing if opts.embed_preprocessing else None
    module = ExportableViT(art.backbone, hw, dtype=dtype, preprocess=pre, patch_tokens=opts.patch_tokens)
    model, used = export_module(module, opset=opts.opset, exporter=opts.exporter)
    fp32_model = None
    if opts.precision == "int8":
        fp32_model = model
        calib = None if opts.int8_scheme == "dynamic" else \
            graph_inputs(inputs.calibration, art.card.preprocessing, hw, opts.embed_preprocessing)
        arch = art.card.architecture
        model = quantize_graph(fp32_model, opts.int8_scheme, calib, arch.num_heads, arch.embed_dim)
    card = art.card.model_dump(mode="json")
    meta = export_metadata(module, card, precision=opts.precision, exporter=used, opset=opts.opset)
    for proto in (model, fp32_model):
        if proto is not None:
            set_metadata(proto, meta)
    return module, model, fp32_model, used


def _graph_entry(path: Path, hw: tuple[int, int], exporter: str) -> dict[str, Any]:
    return {"file": path.name, "resolution": list(hw), "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "exporter": exporter}


def _manifest(art: Artifact, opts: OnnxExportOptions, module: ExportableViT, graphs: list[dict[str, Any]]
              ) -> dict[str, Any]:
    inp, outs = io_names(module)
    dim = art.card.embed_dim
    shapes = {name: ["batch", dim] for name in EMBEDDING_OUTPUTS}
    if opts.patch_tokens:
        shapes[PATCH_OUTPUT] = ["batch", "h*w", dim]
    return {
        "format_version": EXPORT_FORMAT_VERSION, "precision": opts.precision,
        "embed_preprocessing": opts.embed_preprocessing, "opset": opts.opset,
        "artifact": {"name": art.card.name, "weights_sha256": art.sha256, "path": str(art.path)},
        "input": {"name": inp, "dtype": "uint8" if opts.embed_preprocessing else "float32",
                  "layout": "NHWC" if opts.embed_preprocessing else "NCHW"},
        "outputs": [{"name": n, "dtype": "float32", "shape": shapes[n]} for n in outs],
        "default_pooling": art.card.default_pooling, "graphs": graphs,
    }


def _fail_message(report: dict[str, Any]) -> str:
    lines = [f"  {tag}: {c['check']} = {c['value']:.6g} (threshold {c['threshold']:.6g})"
             for tag, section in report["graphs"].items() for c in section["checks"] if not c["passed"]]
    return "parity failed; nothing was written:\n" + "\n".join(lines)


def export_onnx(artifact: str | Path, out: str | Path, opts: OnnxExportOptions) -> dict[str, Any]:
    """Export an artifact to ONNX at every declared resolution, gated by parity.

    Returns:
        The parity report (also written to ``OUT/parity.json``).

    Raises:
        ParityFailure: a threshold was missed (``OUT`` is not created / left unchanged).
        ExportError, ArtifactError, DataError: bad input.
    """
    art = load_artifact(artifact)
    card = art.card
    resolutions = parse_resolutions(opts.resolutions or str(card.preprocessing.size), card.architecture.patch_size)
    inputs = _load_inputs(opts)
    report: dict[str, Any] = {"format_version": EXPORT_FORMAT_VERSION, "artifact": card.name,
                              "artifact_sha256": art.sha256, "precision": opts.precision,
                              "thresholds": opts.thresholds.model_dump(), "graphs": {}}
    graphs: list[dict[str, Any]] = []
    try:
        with atomic_directory(out, overwrite=opts.overwrite) as staging:
            for hw in resolutions:
                module, model, fp32_model, used = _build_graph(art, hw, opts, inputs)
                section = evaluate_graph(art, model, fp32_model, hw, inputs, embed=opts.embed_preprocessing)
                section["checks"] = [c.as_dict() for c in gate(section, opts.precision, opts.thresholds)]
                report["graphs"][resolution_tag(hw)] = section
                path = staging / graph_filename(hw)
                save_model(model, path)
                graphs.append(_graph_entry(path, hw, used))
                log.info("exported %s (%s, %s)", path.name, opts.precision, used)
            report["passed"] = all(c["passed"] for s in report["graphs"].values() for c in s["checks"])
            if opts.report is not None:
                atomic_write_json(opts.report, report)
            if not report["passed"]:
                raise ParityFailure(_fail_message(report))
            atomic_write_json(staging / PARITY_FILE, report)
            atomic_write_json(staging / MANIFEST_FILE, _manifest(art, opts, module, graphs))
            (staging / CARD_COPY).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    except FileExistsError as err:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite") from err
    return report

