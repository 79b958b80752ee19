"""``dinoforge export triton``: one model of a Triton model repository, validated against Triton's schema.

Layout: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/<version>/`` holding ``model.onnx`` (onnxruntime backend),
``model.plan`` (TensorRT) or ``model.py`` + ``model.onnx`` (Python backend running onnxruntime). The config is
built as Triton's ``ModelConfig`` protobuf (shipped in ``tritonclient``), written in text format, then parsed
back and checked by :func:`validate_config` — the same check runs on any hand-written ``config.pbtxt``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from dinoforge.core.config import StrictModel
from dinoforge.core.fileio import atomic_directory
from dinoforge.core.onnx_contract import (TRITON_FILES, TRITON_GRAPH_FILE, engine_description, graph_filename,
                                          parse_resolutions)
from dinoforge.export.errors import ExportError

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_DTYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "UINT8": "TYPE_UINT8", "INT8": "TYPE_INT8",
           "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL", "DOUBLE": "TYPE_FP64",
           "BFLOAT16": "TYPE_BF16"}


class TritonModelOptions(StrictModel):
    """Scheduling and placement of one Triton model."""

    backend: str = Field("onnxruntime", pattern="^(onnxruntime|tensorrt|python)$")
    version: int = Field(1, ge=1)
    max_batch_size: int = Field(32, ge=1)
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [8, 16])
    queue_delay_us: int = Field(100, ge=0)
    instances: int = Field(1, ge=1)
    kind: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    overwrite: bool = False


def model_config_pb2() -> Any:
    """Triton's ``model_config_pb2`` module (from tritonclient)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        from dinoforge.core.errors import MissingDependencyError

        raise MissingDependencyError("tritonclient[grpc] is needed to write/validate Triton configs "
                                     "(pip install 'dinoforge[export]')") from err
    return model_config_pb2


def _io_entry(pb: Any, spec: dict[str, Any], batched: bool) -> Any:
    if spec["dtype"] not in _DTYPES:
        raise ExportError(f"tensor {spec['name']!r} has type {spec['dtype']}, which Triton cannot carry")
    dims = spec["shape"][1:] if batched else spec["shape"]
    return {"name": spec["name"], "data_type": pb.DataType.Value(_DTYPES[spec["dtype"]]), "dims": dims}


def build_config(name: str, io: dict[str, list[dict[str, Any]]], opts: TritonModelOptions) -> Any:
    """A ``ModelConfig`` message: I/O dims exclude the batch axis, dynamic batching, instance groups."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=name, max_batch_size=opts.max_batch_size)
    if opts.backend == "python":
        cfg.backend = "python"
    else:
        cfg.platform = PLATFORMS[opts.backend]
    for spec in io["inputs"]:
        cfg.input.append(pb.ModelInput(**_io_entry(pb, spec, True)))
    for spec in io["outputs"]:
        cfg.output.append(pb.ModelOutput(**_io_entry(pb, spec, True)))
    preferred = sorted(s for s in opts.preferred_batch_sizes if s <= opts.max_batch_size)
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    kind = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}[opts.kind]
    if opts.backend == "python" and opts.kind == "auto":
        kind = "KIND_CPU"  # the Python model runs onnxruntime on CPU
    cfg.instance_group.append(pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.Kind.Value(kind),
                                                    count=opts.instances))
    cfg.default_model_filename = TRITON_FILES[opts.backend]
    return cfg


def config_text(cfg: Any) -> str:
    """Protobuf text format of a ``ModelConfig`` (what Triton reads from ``config.pbtxt``)."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def _check_semantics(cfg: Any, pb: Any, source: str) -> None:
    problems = []
    if not cfg.name:
        problems.append("missing name")
    if not (cfg.platform or cfg.backend):
        problems.append("neither platform nor backend is set")
    if cfg.max_batch_size < 0:
        problems.append("max_batch_size is negative")
    for kind, entries in (("input", cfg.input), ("output", cfg.output)):
        if not entries:
            problems.append(f"no {kind}s")
        for entry in entries:
            if entry.data_type == pb.TYPE_INVALID:
                problems.append(f"{kind} {entry.name!r} has no data_type")
            if not entry.dims or any(d == 0 or d < -1 for d in entry.dims):
                problems.append(f"{kind} {entry.name!r} has invalid dims {list(entry.dims)}")
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size == 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        bad = [s for s in cfg.dynamic_batching.preferred_batch_size if not 0 < s <= cfg.max_batch_size]
        if bad:
            problems.append(f"preferred_batch_size {bad} outside 1..max_batch_size ({cfg.max_batch_size})")
    problems += [f"instance_group {g.name or i} has count {g.count}"
                 for i, g in enumerate(cfg.instance_group) if g.count < 1]
    if problems:
        raise ExportError(f"invalid Triton config {source}: " + "; ".join(problems))


def validate_config(text_or_path: str | Path, *, model_dir: Path | None = None) -> Any:
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig`` and check it.

    Args:
        text_or_path: the text, or a path to ``config.pbtxt``.
        model_dir: the model directory; when given, its name must match and a version dir must hold the
            default model file.

    Raises:
        ExportError: unparsable text (unknown field, bad enum, syntax) or inconsistent content.
    """
    from google.protobuf import text_format

    pb = model_config_pb2()
    is_path = isinstance(text_or_path, Path)
    text = text_or_path.read_text() if is_path else str(text_or_path)
    source = str(text_or_path) if is_path else "<text>"
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as err:
        raise ExportError(f"{source} is not a valid Triton ModelConfig: {err}") from err
    _check_semantics(cfg, pb, source)
    if model_dir is not None:
        if cfg.name != model_dir.name:
            raise ExportError(f"{source}: name {cfg.name!r} differs from the directory name {model_dir.name!r}")
        filename = cfg.default_model_filename or TRITON_GRAPH_FILE
        if not any((v / filename).is_file() for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()):
            raise ExportError(f"{model_dir} has no version directory holding {filename}")
    return cfg


def _onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    from dinoforge.export.tensorrt_build import graph_io

    return graph_io(onnx.load(str(path), load_external_data=False))


def _plan_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    sidecar = engine_description(path)
    if not sidecar.is_file():
        raise ExportError(f"{path} has no {sidecar.name} (written by `dinoforge export tensorrt`) describing its I/O")
    return json.loads(sidecar.read_text())["io"]


def write_triton_model(source: str | Path, repo: str | Path, name: str, opts: TritonModelOptions, *,
                       onnx_options: Any = None) -> Path:
    """Write ``REPO/NAME`` atomically from an artifact, an exported ``.onnx`` or an engine ``.plan``.

    Returns:
        The model directory.
    """
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="dinoforge-triton-") as tmp:
        if source.is_dir():
            source = _export_for_triton(source, Path(tmp) / "onnx", onnx_options)
        if not source.is_file():
            raise ExportError(f"{source} does not exist")
        if opts.backend == "tensorrt" and source.suffix != ".plan":
            raise ExportError("--backend tensorrt needs a .plan engine (build it with `dinoforge export tensorrt`)")
        if opts.backend != "tensorrt" and source.suffix != ".onnx":
            raise ExportError(f"--backend {opts.backend} needs an .onnx graph or an artifact, got {source.name}")
        io = _plan_io(source) if source.suffix == ".plan" else _onnx_io(source)
        cfg = build_config(name, io, opts)
        return _write_model_dir(Path(repo) / name, source, cfg, opts)


def _export_for_triton(artifact: Path, out: Path, onnx_options: Any) -> Path:
    from dinoforge.core.artifact import read_card
    from dinoforge.export.pipeline import OnnxExportOptions, export_onnx

    opts = onnx_options or OnnxExportOptions()
    card = read_card(artifact)
    resolutions = parse_resolutions(opts.resolutions or str(card.preprocessing.size), card.architecture.patch_size)
    if len(resolutions) != 1:
        raise ExportError("a Triton model serves one resolution; pass a single --resolution")
    export_onnx(artifact, out, opts)
    return out / graph_filename(resolutions[0])


def _write_model_dir(model_dir: Path, source: Path, cfg: Any, opts: TritonModelOptions) -> Path:
    text = config_text(cfg)
    try:
        with atomic_directory(model_dir, overwrite=opts.overwrite) as staging:
            version_dir = staging / str(opts.version)
            version_dir.mkdir()
            if opts.backend == "python":
                shutil.copyfile(source, version_dir / TRITON_GRAPH_FILE)
                stub = Path(__file__).with_name("triton_python_model.py")
                shutil.copyfile(stub, version_dir / TRITON_FILES["python"])
            else:
                shutil.copyfile(source, version_dir / TRITON_FILES[opts.backend])
            (staging / "config.pbtxt").write_text(text)
            validate_config(staging / "config.pbtxt")
    except FileExistsError as err:
        raise ExportError(f"{model_dir} already exists; pass --overwrite to replace it") from err
    validate_config(model_dir / "config.pbtxt", model_dir=model_dir)
    return model_dir
