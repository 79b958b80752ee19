"""Write one :class:`ExportableViT` as an ONNX graph: export, simplify, verify, attach metadata."""

from __future__ import annotations

import collections
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from torch import nn

from dinoforge.core import __version__
from dinoforge.core.onnx_contract import (BATCH_DIM, EMBEDDING_OUTPUTS, EXPORT_FORMAT_VERSION, INPUT_NAME, META_CARD,
                                          META_EXPORT, META_LAYOUT, META_PRECISION, META_RESOLUTION, PATCH_OUTPUT,
                                          RAW_INPUT_NAME)
from dinoforge.export.errors import ExportError
from dinoforge.export.graph import ExportableViT

log = logging.getLogger(__name__)
Exporter = Literal["auto", "dynamo", "legacy"]
MIN_OPSET = 18
#: Ops an exported graph may never contain (see docs/export.md): the baked position embedding removes them.
FORBIDDEN_OPS = frozenset({"Resize", "Upsample"})


def io_names(module: ExportableViT) -> tuple[str, list[str]]:
    """Input name and output names of a module under the contract."""
    inp = RAW_INPUT_NAME if module.embed_preprocessing else INPUT_NAME
    outs = list(EMBEDDING_OUTPUTS) + ([PATCH_OUTPUT] if module.return_patches else [])
    return inp, outs


def example_input(module: ExportableViT, batch: int = 2) -> torch.Tensor:
    """A dummy input with the module's contract shape/dtype (values do not matter for export)."""
    h, w = module.resolution
    if module.embed_preprocessing:
        return torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8)
    return torch.randn(batch, 3, h, w)


def _export_dynamo(module: ExportableViT, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    inp, outs = io_names(module)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset, input_names=[inp],
                                    output_names=outs, dynamic_shapes=({0: batch},), verbose=False)
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    return program.model_proto


def _export_legacy(module: ExportableViT, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    inp, outs = io_names(module)
    buffer = io.BytesIO()
    axes = {name: {0: BATCH_DIM} for name in [inp, *outs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset, input_names=[inp],
                          output_names=outs, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def export_module(module: ExportableViT, *, opset: int = MIN_OPSET, exporter: Exporter = "auto"
                  ) -> tuple[onnx.ModelProto, str]:
    """Export, simplify with onnxslim and check the structure of one graph.

    Returns:
        ``(model, exporter_used)``.

    Raises:
        ExportError: opset too old, exporter failure, or a graph that breaks the contract.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    x = example_input(module)
    module.eval()
    used = "legacy" if exporter == "legacy" else "dynamo"
    with torch.no_grad():
        try:
            model = _export_legacy(module, x, opset) if used == "legacy" else _export_dynamo(module, x, opset)
        except Exception as err:  # exporter internals raise anything; auto falls back
            if exporter != "auto":
                raise ExportError(f"the {used} ONNX exporter failed: {type(err).__name__}: {err}") from err
            log.warning("dynamo exporter failed (%s: %s); falling back to the legacy exporter",
                        type(err).__name__, err)
            used = "legacy"
            model = _export_legacy(module, x, opset)
    model = simplify(model)
    check_structure(model, module)
    return model, used


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim simplification (constant folding, dead-node and identity removal)."""
    import onnxslim

    slim = onnxslim.slim(model)
    if not isinstance(slim, onnx.ModelProto):
        raise ExportError("onnxslim did not return a model")
    return slim


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type in the main graph."""
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def check_structure(model: onnx.ModelProto, module: ExportableViT) -> None:
    """The contract's structural promises: names, LayerNormalization ops, no Resize, dynamic batch."""
    onnx.checker.check_model(model)
    ops = op_histogram(model)
    stem_norms = sum(isinstance(m, nn.LayerNorm) for m in module.stem.modules()) if module.stem is not None else 0
    expected_ln = 2 * len(module.blocks) + 1 + stem_norms  # a conv stem adds one channel LayerNorm per layer
    if ops.get("LayerNormalization", 0) != expected_ln:
        raise ExportError(f"expected {expected_ln} LayerNormalization nodes, found "
                          f"{ops.get('LayerNormalization', 0)} (LayerNorm was decomposed)")
    bad = sorted(FORBIDDEN_OPS & ops.keys())
    if bad:
        raise ExportError(f"exported graph contains {bad}; the position embedding must be baked")
    inp, outs = io_names(module)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != [inp] or got_out != outs:
        raise ExportError(f"graph I/O {got_in} -> {got_out} does not match the contract {[inp]} -> {outs}")
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.dim_param == "" or dim0.dim_value:
        raise ExportError("the batch axis of the exported graph is not dynamic")


def export_metadata(module: ExportableViT, card: dict[str, Any], *, precision: str, exporter: str,
                    opset: int) -> dict[str, str]:
    """The ``metadata_props`` of a graph (see docs/export.md)."""
    inp, outs = io_names(module)
    arch = card["architecture"]
    pre = card["preprocessing"]
    info = {
        "format_version": EXPORT_FORMAT_VERSION, "resolution": list(module.resolution), "precision": precision,
        "embed_preprocessing": module.embed_preprocessing, "input_name": inp,
        "input_dtype": "uint8" if module.embed_preprocessing else "float32",
        "input_layout": "NHWC" if module.embed_preprocessing else "NCHW", "outputs": outs,
        "embed_dim": arch["embed_dim"], "patch_size": arch["patch_size"],
        "num_register_tokens": arch["num_register_tokens"], "default_pooling": card["default_pooling"],
        "mean": list(pre["mean"]), "std": list(pre["std"]), "exporter": exporter, "opset": opset,
        "artifact_sha256": card["weights_sha256"], "dinoforge_version": __version__,
    }
    h, w = module.resolution
    return {META_EXPORT: json.dumps(info), META_CARD: json.dumps(card), META_RESOLUTION: f"{h}x{w}",
            META_PRECISION: precision, META_LAYOUT: info["input_layout"]}


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Replace dinoforge keys in ``metadata_props`` (other keys are kept)."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "dinoforge"
    model.producer_version = __version__
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph as one self-contained file (weights inline; ViT-L stays under protobuf's 2 GB)."""
    onnx.save_model(model, str(path))

