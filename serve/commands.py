"""``dinoforge serve`` (+ ``serve build-head``), ``dinoforge embed``, ``dinoforge index build`` and ``dinoforge viz``.

Only argparse (and os) is imported here."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``embed`` to the ``dinoforge`` parser."""
    p = subparsers.add_parser("serve", help="HTTP API: embeddings, classification, retrieval (FastAPI + uvicorn)",
                              description="Serve a model over HTTP. `dinoforge serve build-head` builds a "
                                          "classification head for /v1/classify.")
    _serve_arguments(p)
    p.set_defaults(func=_serve)
    sub = p.add_subparsers(dest="serve_command", metavar="SUBCOMMAND")
    h = sub.add_parser("build-head", help="build a k-NN or linear-probe head from a labelled image folder")
    _head_arguments(h)
    h.set_defaults(func=_build_head)

    e = subparsers.add_parser("embed", help="embed images through a running `dinoforge serve`",
                              description="Embed images through a server. With --out the run is resumable: finished "
                                          "batches go to OUT.partial.jsonl, and a rerun skips them.")
    e.add_argument("images", nargs="+", type=Path, help="image files or folders (recursive)")
    e.add_argument("--server", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    e.add_argument("--api-key", help="Bearer key (default: $DINOFORGE_API_KEY)")
    e.add_argument("--out", type=Path, help="write .npy (vectors; ids in FILE.ids.txt) or .jsonl; default: "
                                            "JSON lines on stdout")
    e.add_argument("--pooling", choices=["cls", "mean", "cls+mean"], help="default: the model card's")
    e.add_argument("--dimensions", type=int, help="keep the first N dimensions")
    e.add_argument("--no-normalize", action="store_true", help="return raw (not L2-normalised) embeddings")
    e.add_argument("--batch-size", type=int, default=32, help="images per request (default 32)")
    e.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    e.add_argument("--retries", type=int, default=8, help="retries of a batch refused with 429/503 or dropped, "
                   "with jittered backoff honouring Retry-After (default 8)")
    e.add_argument("--skip-bad", action="store_true", help="leave out images the server refuses or that cannot be "
                   "read, listed with their reason in OUT.bad.jsonl (default: stop at the first, naming its path)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=_embed)
    _register_index(subparsers)
    _register_viz(subparsers)


def _register_index(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build a searchable index of a folder of images (for `serve --index`)")
    sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    b = sub.add_parser("build", help="embed a folder (resumable) into a serving index with thumbnails",
                       description="Embed every image of --input with --model (resumable: rerun after a crash), "
                                   "store the vectors in the serving index at --index and a thumbnail of each "
                                   "image beside them. Then: dinoforge serve --model M --index DIR.")
    b.add_argument("--model", type=Path, required=True, help="artifact dir, or .onnx file / export folder")
    b.add_argument("--input", required=True, help="image folder (recursive), manifest, or any core.data spec with "
                                                  "random access (fmnist:test[:1000], ...)")
    b.add_argument("--index", type=Path, required=True, help="index directory (created; resumed when it exists)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--num-workers", type=int, default=2, help="image decoding processes (default 2)")
    b.add_argument("--shard-size", type=int, default=10_000, help="images per resumable unit (default 10000)")
    b.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_index_build)


def _register_viz(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("viz", help="pictures of what a model sees: patch PCA, retrieval grids (PNG)")
    sub = p.add_subparsers(dest="viz_command", metavar="SUBCOMMAND", required=True)
    pca = sub.add_parser("pca", help="first three PCA components of the patch tokens as RGB, per image and joint")
    pca.add_argument("images", nargs="+", type=Path, help="image files")
    pca.add_argument("--model", type=Path, required=True, help="artifact dir, or .onnx export with patch tokens")
    pca.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created)")
    pca.set_defaults(func=_viz_pca)
    nb = sub.add_parser("neighbours", help="a grid PNG: each query and its nearest indexed images")
    nb.add_argument("queries", nargs="+", type=Path, help="query image files")
    nb.add_argument("--model", type=Path, required=True, help="the model the index was built with")
    nb.add_argument("--index", type=Path, required=True, help="index directory (from `dinoforge index build`)")
    nb.add_argument("--out", type=Path, required=True, help="folder for neighbours.png (created)")
    nb.add_argument("--k", type=int, default=8, help="neighbours per query (default 8)")
    nb.set_defaults(func=_viz_neighbours)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="artifact dir, .onnx file / export dir, TensorRT engine, or (triton) "
                                              "the Triton model dir / artifact that holds the card")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt", "triton"])
    p.add_argument("--name", dest="model_name", help="model name reported by the API (default: card name)")
    p.add_argument("--device", default="cpu", help="torch / TensorRT device (default cpu)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable); also "
                   "$DINOFORGE_API_KEYS (comma-separated) and --api-key-file")
    p.add_argument("--api-key-file", type=Path, help="file with one key per line")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback --host without API keys "
                   "(refused otherwise: anyone who reaches the port could use the server)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--max-queue-size", type=int, default=512, help="images admitted at once; beyond: 429")
    p.add_argument("--preprocess-workers", type=int, default=2, help="decode/preprocess threads")
    p.add_argument("--threads", dest="torch_threads", type=int,
                   help="intra-op threads of the runtime (torch or ONNX Runtime; default: its own choice)")
    p.add_argument("--providers", type=lambda text: [x.strip() for x in text.split(",") if x.strip()], default=[],
                   help="ONNX Runtime execution providers in order, e.g. TensorrtExecutionProvider,"
                        "CUDAExecutionProvider (onnxruntime-gpu; default: CPU)")
    p.add_argument("--timeout", dest="request_timeout_s", type=float, default=60.0, help="request deadline (s)")
    p.add_argument("--max-payload-mb", type=float, default=64.0)
    p.add_argument("--max-images", dest="max_images_per_request", type=int, default=128)
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="decoded pixels per image")
    p.add_argument("--max-request-pixels", type=int, default=256_000_000, help="decoded pixels per request")
    p.add_argument("--max-response-mb", type=float, default=64.0, help="largest response (beyond: 413)")
    p.add_argument("--max-connections", type=int, default=256, help="open connections (beyond: 503, closed)")
    p.add_argument("--head", type=Path, help="classification head dir (from `serve build-head`)")
    p.add_argument("--index-dir", "--index", dest="index_dir", type=Path,
                   help="retrieval index folder (created if missing; `dinoforge index build` makes one)")
    p.add_argument("--triton-url", help="Triton endpoint host:port (HTTP 8000 / gRPC 8001)")
    p.add_argument("--triton-model", help="model name in the Triton repository")
    p.add_argument("--triton-protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _head_arguments(h: argparse.ArgumentParser) -> None:
    h.add_argument("--model", type=Path, required=True, help="artifact directory the head is built for")
    h.add_argument("--data", required=True, help="labelled images: a folder with one sub-folder per class, or "
                                                 "any core.data spec (manifest:..., fmnist:train[:5000], ...)")
    h.add_argument("--out", type=Path, required=True, help="head directory to create")
    h.add_argument("--kind", choices=["knn", "linear"], default="knn")
    h.add_argument("--pooling", choices=["cls", "mean", "cls+mean"], help="default: card's (k-NN) / cls+mean "
                                                                          "(linear)")
    h.add_argument("--k", type=int, default=20, help="k-NN neighbours (default 20)")
    h.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (default 0.07)")
    h.add_argument("--holdout", type=float, default=0.2, help="share of --data held out to measure accuracy")
    h.add_argument("--epochs", type=int, default=30, help="linear probe epochs")
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--num-workers", type=int, default=0)
    h.add_argument("--device", default="cpu")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--overwrite", action="store_true")
    h.add_argument("--no-progress", action="store_true")


def _serve(args: argparse.Namespace) -> int:
    # Before torch (and its OpenMP runtime) loads: the server runs torch on its inference thread while the
    # preprocessing threads run torch ops of their own, and OpenMP's default spin-waiting makes those thread
    # teams fight for the cores (on the 2-core bench machine, `serve torch` at concurrency 16 went from 0.72x
    # to 1.30x of a raw-backend window in a before/after check; docs/benchmarks.md#serving). An explicit
    # OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The server's numpy work is small (the page's patch PCA: an SVD of a few hundred patches); OpenBLAS's own
    # thread team only wakes up to fight the inference threads for the cores: on the 2-core bench machine one
    # PCA took 170-430 ms with it and ~2 ms without (docs/serve.md, search page figures).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from dinoforge.serve.cli import run_serve

    return run_serve(args)


def _build_head(args: argparse.Namespace) -> int:
    from dinoforge.serve.build_head import run_build_head

    return run_build_head(args)


def _embed(args: argparse.Namespace) -> int:
    from dinoforge.serve.cli import run_embed

    return run_embed(args)


def _index_build(args: argparse.Namespace) -> int:
    from dinoforge.serve.index_build import run_index_build

    return run_index_build(args)


def _viz_pca(args: argparse.Namespace) -> int:
    from dinoforge.serve.viz import run_viz_pca

    return run_viz_pca(args)


def _viz_neighbours(args: argparse.Namespace) -> int:
    from dinoforge.serve.viz import run_viz_neighbours

    return run_viz_neighbours(args)
