"""``dinoforge export edge``: one self-contained folder to copy onto an edge device.

The folder is a regular ``dinoforge export onnx`` output (so ``dinoforge serve --model DIR`` of the torch-free
``dinoforge[edge]`` install serves it as is) at one resolution, plus what a device needs besides the graph:

* ``model_<R>.onnx``: the graph; by default it takes what a camera gives — uint8 RGB ``[B, H, W, 3]`` — and
  casts, transposes to NCHW and normalises inside (``--input float``: normalised float32 ``[B, 3, H, W]``);
* ``model.json`` (the model card), ``export.json`` (manifest), ``parity.json`` (the parity report);
* ``edge.json``: the input contract (name, dtype, layout, shape, what the caller still does), the precision,
  the TensorRT lint result and the sizes of the other files;
* ``SHA256SUMS``: checksums in ``sha256sum -c`` format;
* ``README.md`` and ``build_engine.sh``: how to serve it, and the ``trtexec`` command that builds a TensorRT
  engine on the device (TensorRT runs on the device's GPU; it is not installed where the export runs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from dinoforge.core.config import StrictModel
from dinoforge.core.fileio import atomic_directory, atomic_write_json, atomic_write_text, sha256_file
from dinoforge.core.onnx_contract import MANIFEST_FILE, read_export_metadata
from dinoforge.export.errors import ExportError
from dinoforge.export.pipeline import OnnxExportOptions, export_onnx

EDGE_FILE = "edge.json"
SUMS_FILE = "SHA256SUMS"
ENGINE_SCRIPT = "build_engine.sh"
README_FILE = "README.md"


class EdgeExportOptions(StrictModel):
    """What ``dinoforge export edge`` adds to the ONNX export options."""

    input: Literal["uint8", "float"] = Field("uint8", description="uint8 NHWC pixels or normalised float NCHW")
    opt_batch: int = Field(8, gt=0, description="batch size TensorRT optimises for")
    max_batch: int = Field(32, gt=0, description="largest batch of the TensorRT profile")


def input_contract(export: dict[str, Any]) -> dict[str, Any]:
    """The graph's input as a caller must feed it (from the graph's ``dinoforge.export`` metadata)."""
    h, w = export["resolution"]
    uint8 = export["input_dtype"] == "uint8"
    shape = ["batch", h, w, 3] if uint8 else ["batch", 3, h, w]
    caller = ("decode to RGB, resize and crop to the model's contract, send uint8 pixels as they are"
              if uint8 else "decode to RGB, resize and crop, normalise (x / 255 - mean) / std, transpose to NCHW")
    return {"name": export["input_name"], "dtype": export["input_dtype"], "layout": export["input_layout"],
            "shape": shape, "resolution": [h, w], "normalisation_in_graph": uint8, "mean": export["mean"],
            "std": export["std"], "caller_does": caller}


def trtexec_command(graph: str, contract: dict[str, Any], precision: str, opts: EdgeExportOptions) -> str:
    """The ``trtexec`` command that builds this graph's engine on the device (batch-only profile)."""
    dims = "x".join(str(d) for d in contract["shape"][1:])
    name = contract["name"]
    stem = graph.removesuffix(".onnx")
    parts = [f"trtexec --onnx={graph} --saveEngine={stem}.plan",
             f"--minShapes={name}:1x{dims} --optShapes={name}:{opts.opt_batch}x{dims} "
             f"--maxShapes={name}:{opts.max_batch}x{dims}"]
    # fp16 / int8 (QDQ) graphs carry their types: build them as typed; an fp32 graph may use fp16 kernels.
    parts.append("--stronglyTyped" if precision in ("fp16", "int8") else "--fp16")
    return " \\\n    ".join(parts)


def _lint(graph: Path) -> dict[str, Any]:
    from dinoforge.export.trt_lint import lint_onnx

    findings = lint_onnx(graph)
    errors = [str(f) for f in findings if f.severity == "error"]
    return {"errors": len(errors), "warnings": len(findings) - len(errors), "first_errors": errors[:5]}


def _readme(card_name: str, graph: str, contract: dict[str, Any], precision: str, command: str,
            lint: dict[str, Any]) -> str:
    trt = (f"```bash\n{command}\n```\n\nThe same command is in `{ENGINE_SCRIPT}`. Then serve the engine with "
           "`dinoforge serve --model MODEL.plan --backend tensorrt` (full install), or skip the engine and use "
           "ONNX Runtime's TensorRT execution provider (`onnxruntime-gpu`, `--providers "
           "TensorrtExecutionProvider,CUDAExecutionProvider`).\n"
           if not lint["errors"] else
           f"This graph does not pass the TensorRT lint ({lint['errors']} errors, listed in `{EDGE_FILE}`); "
           "an int8 graph for TensorRT is exported with `--int8-scheme tensorrt`.\n")
    shape = "[" + ", ".join(str(d) for d in contract["shape"]) + "]"
    return f"""# {card_name}: edge export ({precision})

Graph `{graph}`; input `{contract['name']}` {contract['dtype']} {shape} ({contract['layout']}).
The caller must: {contract['caller_does']}. Outputs: `cls_embedding` / `mean_embedding` `[batch, D]` float32
(not L2-normalised). Model card: `model.json`; parity with the PyTorch model: `parity.json`.

Check the files: `sha256sum -c {SUMS_FILE}`.

## Serve it (no torch on the device)

```bash
pip install "dinoforge[edge]"            # ONNX Runtime, numpy, Pillow, FastAPI; no torch
dinoforge serve --model . --threads 2    # then: dinoforge embed IMAGES --server http://127.0.0.1:8000
```

## TensorRT engine (built on the device, by its TensorRT)

{trt}"""


def _finish(folder: Path, precision: str, opts: EdgeExportOptions) -> dict[str, Any]:
    """Write edge.json, README.md, build_engine.sh and SHA256SUMS into an export folder."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    graph = manifest["graphs"][0]["file"]
    meta = read_export_metadata(folder / graph)
    contract = input_contract(meta["export"])
    lint = _lint(folder / graph)
    command = trtexec_command(graph, contract, precision, opts)
    atomic_write_text(folder / README_FILE, _readme(meta["model_card"]["name"], graph, contract, precision,
                                                    command, lint))
    atomic_write_text(folder / ENGINE_SCRIPT, "#!/bin/sh\n# Build the TensorRT engine on the device.\nset -e\n"
                      f'cd "$(dirname "$0")"\n{command}\n')
    (folder / ENGINE_SCRIPT).chmod(0o755)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    edge = {"graph": graph, "precision": precision, "input": contract, "tensorrt_lint": lint,
            "trtexec": command.replace(" \\\n    ", " "), "files": files}
    atomic_write_json(folder / EDGE_FILE, edge)
    sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(folder.iterdir())
                   if p.is_file() and p.name != SUMS_FILE)
    atomic_write_text(folder / SUMS_FILE, sums)
    return edge


def folder_bytes(folder: Path) -> int:
    """Total size of the files of ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_edge(artifact: str | Path, out: str | Path, onnx_opts: OnnxExportOptions,
                opts: EdgeExportOptions) -> dict[str, Any]:
    """Export ``artifact`` to a self-contained edge folder at ``out`` (atomically; parity-gated).

    Returns:
        ``edge.json``'s content plus ``bytes`` (the folder size).

    Raises:
        ParityFailure, ExportError, ArtifactError: as ``export onnx`` (nothing is written).
    """
    if onnx_opts.resolutions and "," in onnx_opts.resolutions:
        raise ExportError("an edge folder holds one graph: give one --resolution")
    onnx_opts = onnx_opts.model_copy(update={"embed_preprocessing": opts.input == "uint8", "overwrite": False})
    try:
        with atomic_directory(out, overwrite=onnx_opts.overwrite) as staging:
            inner = staging / "onnx"
            export_onnx(artifact, inner, onnx_opts)
            for path in inner.iterdir():
                shutil.move(str(path), staging / path.name)
            inner.rmdir()
            edge = _finish(staging, onnx_opts.precision, opts)
    except FileExistsError as err:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite") from err
    return {**edge, "bytes": folder_bytes(Path(out))}
