"""Work behind ``dinoforge serve`` and ``dinoforge embed`` (imported only when those commands run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from dinoforge.core.config import format_validation_error
from dinoforge.core.errors import ConfigError, DataError
from dinoforge.core.fileio import atomic_open, atomic_write_text

if TYPE_CHECKING:
    from dinoforge.serve.embed_job import BadImage
    from dinoforge.serve.settings import ServeSettings

log = logging.getLogger("dinoforge.serve")


def _api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("DINOFORGE_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file is not None:
        try:
            keys += [line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {err}") from err
    return keys


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Build :class:`ServeSettings` from ``dinoforge serve`` arguments (errors name the option)."""
    from dinoforge.serve.settings import ServeSettings

    fields = {k: getattr(args, k) for k in (
        "model", "backend", "model_name", "device", "host", "port", "max_batch_size", "max_queue_delay_ms",
        "max_queue_size", "preprocess_workers", "torch_threads", "request_timeout_s", "max_images_per_request",
        "max_pixels", "max_request_pixels", "max_connections", "head", "index_dir", "triton_url", "triton_model",
        "triton_protocol", "warmup")}
    fields["max_payload_bytes"] = int(args.max_payload_mb * 1024 * 1024)
    fields["max_response_bytes"] = int(args.max_response_mb * 1024 * 1024)
    # bodies in flight: room for at least four of the largest requests
    fields["max_inflight_body_bytes"] = max(256 * 1024 * 1024, 4 * fields["max_payload_bytes"])
    fields["api_keys"] = _api_keys(args)
    fields["insecure_no_auth"] = args.insecure_no_auth
    fields["onnx_providers"] = getattr(args, "providers", [])
    try:
        return ServeSettings(**fields)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "dinoforge serve options")) from None


def run_serve(args: argparse.Namespace) -> int:
    """Load the model (fail fast, exit 2 on bad input), then serve until interrupted."""
    from dinoforge.serve.app import load_resources
    from dinoforge.serve.server import check_port, serve_forever

    settings = settings_from_args(args)
    if settings.model is None and settings.backend != "triton":
        raise ConfigError("dinoforge serve needs --model (an artifact dir, an .onnx export or a TensorRT engine)")
    if settings.insecure_no_auth and not settings.api_keys:
        log.warning("--insecure-no-auth: anyone who can reach %s:%d can use the server", settings.host,
                    settings.port)
    check_port(settings.host, settings.port)
    resources = load_resources(settings)  # errors here are the user's: clear message, exit 2
    log.info("dinoforge serve: %s on http://%s:%d (docs at /docs)", resources.backend.describe(), settings.host,
             settings.port)
    serve_forever(settings, resources, log_level=args.log_level)
    return 0


def _write_output(out: Path | None, names: list[str], vectors: np.ndarray) -> None:
    if out is None:
        for name, vec in zip(names, vectors, strict=True):
            sys.stdout.write(json.dumps({"id": name, "embedding": vec.tolist()}) + "\n")
        return
    if out.suffix == ".npy":
        with atomic_open(out, "wb") as handle:
            np.save(handle, vectors)
        atomic_write_text(out.with_name(out.name + ".ids.txt"), "".join(f"{n}\n" for n in names))
    elif out.suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps({"id": n, "embedding": v.tolist()}) + "\n"
                                       for n, v in zip(names, vectors, strict=True)))
    else:
        raise ConfigError(f"--out {out}: use a .npy or .jsonl file")


def _write_bad_report(out: Path | None, bad: list[BadImage]) -> None:
    """``OUT.bad.jsonl`` (path, status, reason per line) beside the output, or the list on stderr."""
    if not bad:
        return
    lines = [json.dumps({"path": b.name, "status": b.status, "reason": b.reason}) for b in bad]
    if out is None:
        print("\n".join(f"skipped {b.name}: {b.reason}" for b in bad), file=sys.stderr)
        return
    report = out.with_name(out.name + ".bad.jsonl")
    atomic_write_text(report, "".join(line + "\n" for line in lines))
    print(f"skipped {len(bad)} images (listed in {report})", file=sys.stderr)


def run_embed(args: argparse.Namespace) -> int:
    """Embed files/folders through a server and print or save the vectors (resumable when ``--out`` is given)."""
    from dinoforge.serve.client import AsyncDinoforgeClient
    from dinoforge.serve.client_inputs import expand_images
    from dinoforge.serve.embed_job import Journal, run_embed_job

    if args.out is not None and args.out.suffix not in (".npy", ".jsonl"):
        raise ConfigError(f"--out {args.out}: use a .npy or .jsonl file")
    if args.batch_size <= 0 or args.concurrency <= 0 or args.retries < 0:
        raise ConfigError("--batch-size and --concurrency must be positive, --retries not negative")
    key = args.api_key or os.environ.get("DINOFORGE_API_KEY")
    refs = expand_images(args.images)
    options = {k: v for k, v in {"pooling": args.pooling, "dimensions": args.dimensions,
                                 "normalize": not args.no_normalize}.items() if v is not None}
    journal = None if args.out is None else Journal(args.out.with_name(args.out.name + ".partial.jsonl"),
                                                    {**options, "server": args.server})

    async def go():  # noqa: ANN202
        async with AsyncDinoforgeClient(args.server, api_key=key, timeout=args.timeout, batch_size=args.batch_size,
                                        concurrency=args.concurrency, retries=args.retries) as client:
            return await run_embed_job(client, refs, options, journal=journal, skip_bad=args.skip_bad,
                                       progress=not args.no_progress)

    result = asyncio.run(go())
    if len(result.names) == 0 and not result.bad:
        raise DataError("no images given")
    _write_output(args.out, result.names, result.vectors)
    _write_bad_report(args.out, result.bad)
    if journal is not None:
        journal.path.unlink(missing_ok=True)  # the output is complete and durable: nothing left to resume
        dim = result.vectors.shape[1] if result.vectors.ndim == 2 else 0
        print(f"wrote {args.out} ({len(result.names)} x {dim})", file=sys.stderr)
    return 0
