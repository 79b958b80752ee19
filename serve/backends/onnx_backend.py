"""ONNX Runtime backend: serves a graph written by ``dinoforge export onnx``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dinoforge.core.errors import ArtifactError, MissingDependencyError
from dinoforge.core.onnx_contract import CARD_COPY, GRAPH_GLOB, graph_filename
from dinoforge.core.ort_session import create_session
from dinoforge.serve.backends.base import Features
from dinoforge.serve.backends.exported import ExportedBackend, GraphContract


def pick_graph(path: str | Path, resolution: int | None = None) -> Path:
    """Resolve ``path`` (an ``.onnx`` file or an export directory) to one graph file.

    In a directory, the graph at ``resolution`` is taken, else the one matching the card's preprocessing
    size, else the first one listed in ``export.json``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ArtifactError(f"{path} does not exist (expected an .onnx file or a `dinoforge export onnx` folder)")
    graphs = sorted(path.glob(GRAPH_GLOB)) or sorted(path.glob("*.onnx"))
    if not graphs:
        raise ArtifactError(f"{path} holds no .onnx graph")
    wanted = resolution
    if wanted is None and (path / CARD_COPY).is_file():
        try:
            wanted = json.loads((path / CARD_COPY).read_text())["preprocessing"]["size"]
        except (json.JSONDecodeError, KeyError, TypeError):
            wanted = None
    for graph in graphs:
        if wanted is not None and graph.name == graph_filename((wanted, wanted)):
            return graph
    if resolution is not None:
        raise ArtifactError(f"{path} has no graph at resolution {resolution} "
                            f"(found {', '.join(g.name for g in graphs)})")
    return graphs[0]


class OnnxRuntimeBackend(ExportedBackend):
    """Runs an exported graph with an ``onnxruntime.InferenceSession``.

    Args:
        path: ``.onnx`` file or export directory.
        providers: ORT execution providers (default ``["CPUExecutionProvider"]``).
        intra_op_threads: ORT intra-op threads (default: ORT's choice).
        resolution: pick this graph from an export directory.
        name: model name reported by the API.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, resolution: int | None = None,
                 name: str | None = None) -> None:
        self.path = pick_graph(path, resolution)
        try:
            self.session = create_session(self.path, threads=intra_op_threads or 0, providers=providers)
        except MissingDependencyError:
            raise
        except Exception as err:  # ORT raises its own exception types for bad files
            raise ArtifactError(f"onnxruntime cannot load {self.path}: {err}") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        super().__init__(GraphContract.from_metadata(meta, str(self.path)), name)
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [self.contract.input_name]:
            raise ArtifactError(f"{self.path}: inputs {inputs} do not match the export metadata "
                                f"({self.contract.input_name})")

    def core(self, pixels: np.ndarray) -> Features:
        """``[B, 3, H, W]`` float32 (or ``[B, H, W, 3]`` uint8) -> features, through one ``session.run``."""
        names = self.output_names
        values = self.session.run(names, {self.contract.input_name: self.graph_input(pixels)})
        return self.features(dict(zip(names, values, strict=True)))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "graph": str(self.path), "providers": self.session.get_providers()}
