"""TensorRT backend (optional): runs an engine built by ``dinoforge export tensorrt`` on a CUDA device.

I/O buffers are torch CUDA tensors (no pycuda), bound by name with the TensorRT 10/11 tensor API
(``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``). The model card comes from the ONNX graph
the engine was built from: the ``.onnx`` passed as ``--model`` (then the engine is looked up next to it or
given with ``engine=``), or the one named by the engine's ``.json`` description.

TensorRT cannot be installed on the development machine (no GPU): this module raises a clear
:class:`~dinoforge.core.errors.MissingDependencyError` there and its tests are skipped with that reason. The
engine runs through :mod:`dinoforge.core.tensorrt`, the code the export's parity check runs it with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dinoforge.core.errors import ArtifactError, ConfigError
from dinoforge.core.onnx_contract import ENGINE_SOURCE_KEY, engine_description, engine_glob, graph_metadata
from dinoforge.core.tensorrt import engine_io, execute, import_tensorrt, load_engine
from dinoforge.serve.backends.base import Features
from dinoforge.serve.backends.exported import ExportedBackend, GraphContract


def source_onnx(engine: Path) -> Path:
    """The ONNX graph an engine was built from, read from the engine's ``.json`` description."""
    side = engine_description(engine)
    if side.is_file():
        try:
            desc = json.loads(side.read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{side} is not valid JSON: {err}") from err
        value = desc.get(ENGINE_SOURCE_KEY) if isinstance(desc, dict) else None
        if isinstance(value, str) and value.endswith(".onnx"):
            path = Path(value)
            path = path if path.is_absolute() else (engine.parent / path)
            if path.is_file():
                return path
    candidates = sorted(engine.parent.glob("*.onnx"))
    if len(candidates) == 1:
        return candidates[0]
    raise ArtifactError(f"cannot find the ONNX graph engine {engine.name} was built from (it holds the model "
                        f"card); serve the .onnx with --backend tensorrt instead")


class TensorRTBackend(ExportedBackend):
    """Runs a serialized TensorRT engine.

    Args:
        engine_path: ``.plan`` / ``.engine`` file.
        contract: the graph contract of the ONNX it was built from.
        device: CUDA device (``cuda`` or ``cuda:N``).
        name: model name reported by the API.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, contract: GraphContract, *, device: str = "cuda",
                 name: str | None = None) -> None:
        self.trt = import_tensorrt()
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise ConfigError(f"TensorRT runs on a CUDA device; got --device {device} "
                              f"(CUDA available: {torch.cuda.is_available()})")
        super().__init__(contract, name)
        self.device = torch.device(device)
        self.engine_path = Path(engine_path)
        with torch.cuda.device(self.device):
            self.engine = load_engine(self.trt, self.engine_path)
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = engine_io(self.trt, self.engine)
        if self.inputs != [contract.input_name]:
            raise ArtifactError(f"engine inputs {self.inputs} do not match the ONNX contract ({contract.input_name})")
        self.max_batch = int(self.engine.get_tensor_profile_shape(contract.input_name, 0)[2][0])

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "cuda", name: str | None = None) -> TensorRTBackend:
        """``path`` is an engine (its ONNX found through its ``.json``) or an ``.onnx`` with an engine beside it."""
        from dinoforge.serve.backends.onnx_backend import pick_graph

        import_tensorrt()  # the most basic requirement first: say so before looking at files
        path = Path(path)
        if path.suffix == ".onnx" or path.is_dir():
            onnx_path = pick_graph(path)
            engines = sorted(onnx_path.parent.glob(engine_glob(onnx_path)))
            if not engines:
                raise ArtifactError(f"no TensorRT engine next to {onnx_path}; build one with "
                                    f"`dinoforge export tensorrt {onnx_path} --out {onnx_path.parent}`")
            engine = engines[-1]
        else:
            engine, onnx_path = path, source_onnx(path)
        return cls(engine, GraphContract.from_metadata(graph_metadata(onnx_path), str(onnx_path)), device=device,
                   name=name)

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return execute(self.trt, self.engine, self.context, {self.contract.input_name: x}, self.device)

    def core(self, pixels: np.ndarray) -> Features:
        """``[B, 3, H, W]`` -> features; batches above the engine profile's maximum run in parts."""
        x = torch.from_numpy(self.graph_input(pixels)).to(self.device)
        parts = [self._run(x[i:i + self.max_batch].contiguous()) for i in range(0, len(x), self.max_batch)]
        merged = {n: torch.cat([p[n] for p in parts]).float().cpu().numpy() for n in self.output_names}
        return self.features(merged)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "engine": str(self.engine_path), "device": str(self.device),
                "max_batch": self.max_batch}
