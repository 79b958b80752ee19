"""``dinoforge export {onnx,edge,check-trt,tensorrt,triton}`` (argparse only; work is imported when a command runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports export code only when a command runs
    from dinoforge.export.pipeline import OnnxExportOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dinoforge export ...`` to the ``dinoforge`` parser."""
    parser = subparsers.add_parser("export", help="export an artifact to ONNX / TensorRT / Triton, gated by parity")
    sub = parser.add_subparsers(dest="export_command", metavar="TARGET", required=True)
    _register_onnx(sub)
    _register_edge(sub)
    _register_check_trt(sub)
    _register_tensorrt(sub)
    _register_triton(sub)


def _add_graph_flags(p: argparse.ArgumentParser) -> None:
    """What every exported graph needs, for `export onnx` and `export edge` alike: source, folder, precision."""
    p.add_argument("artifact", type=Path, help="model artifact directory")
    p.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--patch-tokens", action="store_true", help="also output the patch tokens")
    p.add_argument("--calibration", type=Path, help="image folder for int8 calibration (static int8 schemes)")
    p.add_argument("--calibration-limit", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--int8-scheme", choices=["cpu", "tensorrt", "dynamic", "mixed"], default="cpu",
                   help="int8 activations: cpu = static uint8 asymmetric (ONNX Runtime), tensorrt = static int8 "
                        "symmetric (TensorRT / trtexec), dynamic = fused attention, quantized per batch at run "
                        "time, no calibration (fast on ONNX Runtime's x86 CPU provider), mixed = dynamic plus a "
                        "static int8 conv stem (fastest there for hybrid ViTs); dynamic and mixed are not for "
                        "TensorRT")


def _add_parity_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parity-images", type=Path, help="folder of real images for parity (default: foolbox samples)")
    p.add_argument("--parity-limit", type=int, default=100, help="images used for parity (default 100)")
    p.add_argument("--knn-data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="Fashion-MNIST IDX folder for the k-NN check (default: the Debian package's)")
    p.add_argument("--knn-limit", type=int, default=500, help="labelled images for k-NN; 0 disables (default 500)")
    p.add_argument("--threshold", dest="thresholds", action="append", default=[], metavar="KEY=VALUE",
                   help="parity threshold, e.g. fp16_min_cosine=0.9995 or max_knn_drop_pt=1.0")
    p.add_argument("--report", type=Path, help="also write parity.json here (kept when parity fails)")


def _register_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("onnx", help="export an artifact to ONNX (one graph per resolution) with a parity report")
    _add_graph_flags(p)
    p.add_argument("--resolutions", help="comma-separated sizes, N or HxW (default: the card's crop size)")
    p.add_argument("--embed-preprocessing", action="store_true",
                   help="graph input is uint8 NHWC pixels, normalised inside the graph")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="torch.onnx exporter; auto = dynamo, falling back to legacy (default auto)")
    _add_parity_flags(p)
    p.set_defaults(func=_onnx)


def _register_edge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="one self-contained folder for an edge device: graph, card, checksums, "
                                    "parity report, trtexec command (docs/edge.md)")
    _add_graph_flags(p)
    p.add_argument("--input", choices=["uint8", "float"], default="uint8",
                   help="uint8 = camera pixels [B, H, W, 3], normalised inside the graph (default); "
                        "float = normalised float32 [B, 3, H, W]")
    p.add_argument("--resolution", dest="resolutions", help="input size N or HxW (default: the card's crop size)")
    p.add_argument("--opt-batch", type=int, default=8, help="batch size of the trtexec profile's optimum")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the trtexec profile")
    _add_parity_flags(p)
    p.set_defaults(func=_edge)


def _register_check_trt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-trt", help="lint an ONNX graph against TensorRT's ONNX operator support")
    p.add_argument("model", type=Path, help="ONNX file")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.set_defaults(func=_check_trt)


def _register_tensorrt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tensorrt", help="build a TensorRT engine (needs the tensorrt package and a GPU)")
    p.add_argument("model", type=Path, help="ONNX file exported by `dinoforge export onnx`")
    p.add_argument("--out", type=Path, required=True, help="engine directory (engine files named by cache key)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit (default 4096)")
    p.add_argument("--min-cosine", type=float, help="parity threshold vs ONNX Runtime (default: by precision)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity run after the build")
    p.set_defaults(func=_tensorrt)


def _register_triton(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton", help="write a Triton model repository entry")
    p.add_argument("source", type=Path, help="artifact directory, exported .onnx, or engine .plan")
    p.add_argument("--repo", type=Path, required=True, help="model repository root")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt", "python"], default="onnxruntime")
    p.add_argument("--version", type=int, default=1, help="model version directory (default 1)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--preferred-batch-sizes", default="8,16", help="dynamic batching preferred sizes")
    p.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching max queue delay")
    p.add_argument("--instances", type=int, default=1, help="instances per device")
    p.add_argument("--kind", choices=["cpu", "gpu", "auto"], default="auto", help="instance group kind")
    p.add_argument("--resolution", help="export resolution when SOURCE is an artifact (default: card size)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="precision when SOURCE is an artifact")
    p.add_argument("--calibration", type=Path, help="int8 calibration folder when SOURCE is an artifact")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model entry")
    _add_parity_flags(p)
    p.set_defaults(func=_triton)


def _onnx_options(args: argparse.Namespace, **extra: object) -> OnnxExportOptions:
    from dinoforge.core.config import apply_overrides, build_config
    from dinoforge.export.parity import ParityThresholds
    from dinoforge.export.pipeline import OnnxExportOptions

    thresholds = build_config(ParityThresholds, apply_overrides({}, args.thresholds), source="--threshold")
    values = {"precision": args.precision, "calibration": args.calibration, "parity_images": args.parity_images,
              "parity_limit": args.parity_limit, "knn_data": args.knn_data, "knn_limit": args.knn_limit,
              "thresholds": thresholds, "report": args.report, **extra}
    return build_config(OnnxExportOptions, values, source="command line")


def _onnx(args: argparse.Namespace) -> int:
    from dinoforge.export.pipeline import export_onnx
    from dinoforge.export.report import format_report

    opts = _onnx_options(args, resolutions=args.resolutions, embed_preprocessing=args.embed_preprocessing,
                         patch_tokens=args.patch_tokens, opset=args.opset, exporter=args.exporter,
                         calibration_limit=args.calibration_limit, int8_scheme=args.int8_scheme,
                         overwrite=args.overwrite)
    report = export_onnx(args.artifact, args.out, opts)
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


def _edge(args: argparse.Namespace) -> int:
    from dinoforge.export.edge import EdgeExportOptions, export_edge
    from dinoforge.export.report import format_report

    opts = _onnx_options(args, resolutions=args.resolutions, patch_tokens=args.patch_tokens,
                         calibration_limit=args.calibration_limit, int8_scheme=args.int8_scheme,
                         overwrite=args.overwrite)
    edge = export_edge(args.artifact, args.out, opts, EdgeExportOptions(input=args.input, opt_batch=args.opt_batch,
                                                                        max_batch=args.max_batch))
    print(format_report(json.loads((args.out / "parity.json").read_text())))
    contract = edge["input"]
    print(f"input {contract['name']} {contract['dtype']} {contract['layout']} {contract['shape']}; "
          f"TensorRT lint: {edge['tensorrt_lint']['errors']} errors")
    print(f"wrote {args.out}: {sum(1 for _ in args.out.iterdir())} files, {edge['bytes'] / 1e6:.2f} MB")
    return 0


def _check_trt(args: argparse.Namespace) -> int:
    import json

    from dinoforge.export.trt_lint import lint_onnx

    findings = lint_onnx(args.model)
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for finding in findings:
            print(finding)
        errors = sum(f.severity == "error" for f in findings)
        print(f"{args.model}: {errors} error(s), {len(findings) - errors} warning(s)")
    return 1 if any(f.severity == "error" for f in findings) else 0


def _tensorrt(args: argparse.Namespace) -> int:
    from dinoforge.export.tensorrt_build import TensorRTBuildConfig, build_engine

    cfg = TensorRTBuildConfig(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                              workspace_mb=args.workspace_mb, min_cosine=args.min_cosine,
                              parity=not args.no_parity)
    result = build_engine(args.model, args.out, cfg)
    print(f"engine {result.engine_path} (cache key {result.key}, {'reused' if result.reused else 'built'})")
    return 0


def _triton(args: argparse.Namespace) -> int:
    from dinoforge.export.triton_repo import TritonModelOptions, write_triton_model

    sizes = [int(s) for s in args.preferred_batch_sizes.split(",") if s.strip()]
    opts = TritonModelOptions(backend=args.backend, version=args.version, max_batch_size=args.max_batch_size,
                              preferred_batch_sizes=sizes, queue_delay_us=args.queue_delay_us,
                              instances=args.instances, kind=args.kind, overwrite=args.overwrite)
    onnx_opts = _onnx_options(args, resolutions=args.resolution) if args.source.is_dir() else None
    path = write_triton_model(args.source, args.repo, args.name, opts, onnx_options=onnx_opts)
    print(f"wrote {path}")
    return 0
