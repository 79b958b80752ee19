"""Typed settings of ``dinoforge serve`` (one place for every limit and knob)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from dinoforge.core.config import StrictModel
from dinoforge.core.image_contract import DEFAULT_MAX_PIXELS

BackendName = Literal["auto", "torch", "onnxruntime", "tensorrt", "triton", "fake"]


class ServeSettings(StrictModel):
    """Everything the app factory needs; built by the CLI or directly in Python.

    Limits protect the server from hostile or careless clients: payload bytes (413), images per request
    (413), decoded pixels per image (decompression bombs, 413), queue capacity (429 with ``Retry-After``)
    and a per-request deadline (504).
    """

    model: Path | None = Field(None, description="artifact dir, .onnx file, TensorRT engine or Triton model dir")
    backend: BackendName = "auto"
    model_name: str | None = Field(None, description="name reported by the API (default: the card's name)")
    device: str = Field("cpu", description="torch / TensorRT device, e.g. cpu or cuda:0")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys; empty = no auth (only "
                                      "on a loopback address, or with insecure_no_auth)")
    insecure_no_auth: bool = Field(False, description="allow a non-loopback bind without API keys")
    # batching engine
    max_batch_size: int = Field(32, gt=0)
    max_queue_delay_ms: float = Field(2.0, ge=0, description="how long a partial batch waits for more images")
    max_queue_size: int = Field(512, gt=0, description="images admitted at once; beyond this: 429")
    preprocess_workers: int = Field(2, gt=0, description="threads decoding and preprocessing images")
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads of torch, and of ONNX Runtime unless "
                                                             "intra_op_threads is set (default: the runtime.s)")
    request_timeout_s: float = Field(60.0, gt=0, description="default deadline of a request")
    warmup: bool = True
    # security limits
    max_payload_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_images_per_request: int = Field(128, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels per image")
    max_request_pixels: int = Field(4 * DEFAULT_MAX_PIXELS, gt=0, description="decoded pixels per request "
                                    "(JPEGs count at their reduced decode scale)")
    large_image_pixels: int = Field(4_000_000, gt=0, description="images decoding to more pixels go to one "
                                    "dedicated decode thread, so small requests never wait behind them")
    max_top_k: int = Field(1000, gt=0)
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0, description="estimated response size; beyond: 413")
    # slow or numerous clients
    max_connections: int = Field(256, gt=0, description="open connections; beyond: 503 and closed")
    header_timeout_s: float = Field(10.0, gt=0, description="time to send a complete request head")
    body_timeout_s: float = Field(10.0, gt=0, description="longest pause between two chunks of a request body")
    max_inflight_body_bytes: int = Field(256 * 1024 * 1024, gt=0, description="request bodies held at once "
                                         "(all requests); beyond: 429")
    # classification head and retrieval index
    head: Path | None = Field(None, description="classification head built by `dinoforge serve build-head`")
    index_dir: Path | None = Field(None, description="folder holding the retrieval index (created if missing)")
    index_exact_limit: int = Field(200_000, gt=0, description="above this many vectors use core.index")
    # remote / compiled backends
    triton_url: str | None = None
    triton_model: str | None = None
    triton_protocol: Literal["http", "grpc"] = "http"
    onnx_providers: list[str] = Field(default_factory=list, description="ORT providers (default: CPU)")
    intra_op_threads: int | None = Field(None, gt=0, description="ONNX Runtime intra-op threads")

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if not self.api_keys and not self.insecure_no_auth and not is_loopback(self.host):
            raise ValueError(f"binding {self.host} without an API key would let anyone who reaches the port use "
                             "the server: give keys (--api-key, --api-key-file, $DINOFORGE_API_KEYS) or pass "
                             "--insecure-no-auth")
        if self.backend == "triton" and not (self.triton_url and self.triton_model):
            raise ValueError("the triton backend needs triton_url and triton_model")
        if self.max_inflight_body_bytes < self.max_payload_bytes:
            raise ValueError(f"max_inflight_body_bytes {self.max_inflight_body_bytes} is smaller than "
                             f"max_payload_bytes {self.max_payload_bytes}: the largest request could never be read")
        if self.max_queue_size < self.max_images_per_request:
            raise ValueError(f"max_queue_size {self.max_queue_size} is smaller than max_images_per_request "
                             f"{self.max_images_per_request}: such a request could never be admitted")
        return self

    def key_values(self) -> list[str]:
        """The configured API keys in clear text."""
        return [k.get_secret_value() for k in self.api_keys]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
