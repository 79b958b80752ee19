"""Remote backend: a Triton Inference Server model (KServe v2) reached with ``tritonclient`` (HTTP or gRPC).

The model is one written by ``dinoforge export triton`` (same I/O contract as the ONNX export). Its card comes
from ``card_source``: the Triton model folder (``NAME/<version>/model.onnx`` metadata), an export folder, an
``.onnx`` file, or the artifact itself (then the input name, dtype and resolution come from Triton's model
metadata). Batches larger than the model's ``max_batch_size`` are split.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dinoforge.core.card import is_artifact, read_card
from dinoforge.core.errors import ArtifactError, ConfigError, MissingDependencyError
from dinoforge.core.onnx_contract import (CLS_OUTPUT, INPUT_NAME, MEAN_OUTPUT, PATCH_OUTPUT, RAW_INPUT_NAME,
                                          TRITON_GRAPH_FILE, graph_metadata)
from dinoforge.serve.backends.base import Features
from dinoforge.serve.backends.exported import ExportedBackend, GraphContract
from dinoforge.serve.errors import BackendError

_DTYPES = {"FP32": np.float32, "UINT8": np.uint8}


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as err:
        raise MissingDependencyError(f"the triton backend needs `pip install tritonclient[{protocol}]`") from err
    return module


def _graph_in_model_dir(path: Path) -> Path | None:
    versions = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for version in reversed(versions):
        if (version / TRITON_GRAPH_FILE).is_file():
            return version / TRITON_GRAPH_FILE
    return None


def contract_from_source(source: Path, metadata: dict[str, Any]) -> GraphContract:
    """Build the graph contract from a local file/folder plus Triton's model metadata."""
    from dinoforge.serve.backends.onnx_backend import pick_graph

    if is_artifact(source):
        return _contract_from_card(source, metadata)
    graph = _graph_in_model_dir(source) if source.is_dir() else None
    graph = graph or pick_graph(source)
    return GraphContract.from_metadata(graph_metadata(graph), str(graph))


def _contract_from_card(artifact: Path, metadata: dict[str, Any]) -> GraphContract:
    card = read_card(artifact)
    (inp,) = metadata["inputs"]
    dims = [int(d) for d in inp["shape"]][-3:]  # batch axis dropped; [3, H, W] or [H, W, 3]
    uint8 = inp["name"] == RAW_INPUT_NAME
    side = dims[0] if uint8 else dims[1]
    if side <= 0:
        raise ArtifactError(f"Triton model input {inp['name']} has no fixed resolution ({inp['shape']})")
    return GraphContract(card=card, resolution=side, input_name=inp["name"], uint8_input=uint8,
                         outputs=tuple(o["name"] for o in metadata["outputs"]))


class TritonBackend(ExportedBackend):
    """Sends batches to a Triton model.

    Args:
        url: ``host:port`` of Triton's HTTP (default 8000) or gRPC (default 8001) endpoint.
        model: Triton model name.
        card_source: where the model card comes from (see module docstring).
        protocol: ``http`` or ``grpc``.
        version: model version ("" = Triton's policy).
        timeout_s: network timeout per call.
        name: model name reported by the API.
    """

    name = "triton"

    def __init__(self, url: str, model: str, *, card_source: str | Path, protocol: str = "http",
                 version: str = "", timeout_s: float = 60.0, name: str | None = None) -> None:
        self.module = _client_module(protocol)
        self.protocol, self.model, self.version = protocol, model, version
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.timeout_s = timeout_s
        # tritonclient.http runs on gevent: a client may only be used by the thread that created it
        self._local = threading.local()
        self._clients: list[Any] = []
        client = self._client()
        self._check_ready(client)
        metadata = self._call(client.get_model_metadata, model, version, **self._json)
        config = self._call(client.get_model_config, model, version, **self._json)
        config = config.get("config", config)  # gRPC wraps it
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        super().__init__(contract_from_source(Path(card_source), metadata), name)
        names = {i["name"] for i in metadata["inputs"]}
        if names != {self.contract.input_name} or self.contract.input_name not in (INPUT_NAME, RAW_INPUT_NAME):
            raise ArtifactError(f"Triton model {model!r} takes {sorted(names)}, but the card source describes "
                                f"input {self.contract.input_name!r}")
        served = {o["name"] for o in metadata["outputs"]}
        if not {CLS_OUTPUT, MEAN_OUTPUT} <= served:
            raise ArtifactError(f"Triton model {model!r} outputs {sorted(served)}; expected {CLS_OUTPUT} and "
                                f"{MEAN_OUTPUT} (a `dinoforge export triton` model)")
        self._patch = PATCH_OUTPUT in served

    @property
    def _json(self) -> dict[str, bool]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _client(self) -> Any:
        """This thread's client (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is not None:
            return client
        kwargs = ({"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}
                  if self.protocol == "http" else {})
        try:
            client = self.module.InferenceServerClient(url=self.url, **kwargs)
        except Exception as err:  # tritonclient raises several types for bad URLs
            raise ConfigError(f"cannot create a Triton {self.protocol} client for {self.url}: {err}") from err
        self._local.client = client
        self._clients.append(client)
        return client

    def _check_ready(self, client: Any) -> None:
        if not self._call(client.is_server_ready):
            raise BackendError(f"Triton at {self.url} is not ready")
        if not self._call(client.is_model_ready, self.model, self.version):
            raise BackendError(f"Triton at {self.url} has no ready model {self.model!r} "
                               "(check its model repository and logs)")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as err:
            raise BackendError(f"Triton at {self.url}: {err.message()}") from err
        except (ConnectionError, OSError) as err:
            raise BackendError(f"cannot reach Triton at {self.url} ({self.protocol}): {err}") from err

    @property
    def has_patch_tokens(self) -> bool:
        return getattr(self, "_patch", False) and PATCH_OUTPUT in self.contract.outputs

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        dtype = "UINT8" if self.contract.uint8_input else "FP32"
        inp = self.module.InferInput(self.contract.input_name, list(batch.shape), dtype)
        inp.set_data_from_numpy(batch)
        outputs = [self.module.InferRequestedOutput(n) for n in self.output_names]
        result = self._call(self._client().infer, self.model, [inp], model_version=self.version, outputs=outputs)
        return {n: result.as_numpy(n) for n in self.output_names}

    def core(self, pixels: np.ndarray) -> Features:
        """``[B, 3, H, W]`` -> features; batches above Triton's ``max_batch_size`` go in several calls."""
        arr = self.graph_input(pixels)
        step = self.max_batch_size or len(arr)
        parts = [self._infer(arr[i:i + step]) for i in range(0, len(arr), step)]
        merged = {n: np.concatenate([p[n] for p in parts]) for n in self.output_names}
        return self.features(merged)

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):  # a gevent client closed from another thread may complain
                client.close()

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "triton_url": self.url, "triton_model": self.model,
                "protocol": self.protocol, "max_batch_size": self.max_batch_size}
