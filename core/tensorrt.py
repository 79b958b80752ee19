"""Running a serialized TensorRT engine: shared by the export's parity check and the serving backend.

Written against the TensorRT 10/11 tensor API (``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``). Device buffers are torch CUDA tensors (torch is a dependency already), so no pycuda or
cuda-python is needed. ``tensorrt`` is optional: :func:`import_tensorrt` says how to get it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinoforge.core.errors import ArtifactError, MissingDependencyError

# TensorRT data type name -> torch dtype (looked up by name: the enum members differ between versions).
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


def import_tensorrt() -> Any:
    """``import tensorrt``, or a :class:`MissingDependencyError` saying how to get it."""
    try:
        import tensorrt
    except ImportError as err:
        raise MissingDependencyError(
            "TensorRT is not installed: `pip install tensorrt` (>= 10) on a machine with an NVIDIA GPU and CUDA; "
            "the ONNX export, `dinoforge export check-trt` and the onnxruntime backend work without it") from err
    return tensorrt


def load_engine(trt: Any, path: Path) -> Any:
    """Deserialize an engine file on the current CUDA device.

    Raises:
        ArtifactError: the file is not an engine for this TensorRT version and GPU.
    """
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise ArtifactError(f"TensorRT could not load {path} (built with another TensorRT version or GPU? "
                            "rebuild it with `dinoforge export tensorrt`)")
    return engine


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type.

    Raises:
        ArtifactError: a type with no torch counterpart.
    """
    for name, torch_type in _TORCH_DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_type
    raise ArtifactError(f"TensorRT tensor type {dtype} has no torch counterpart")


def engine_io(trt: Any, engine: Any) -> tuple[list[str], list[str]]:
    """Input and output tensor names of an engine, in binding order."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return inputs, [n for n in names if n not in inputs]


def execute(trt: Any, engine: Any, context: Any, inputs: Mapping[str, torch.Tensor],
            device: torch.device) -> dict[str, torch.Tensor]:
    """Run an execution context once on contiguous CUDA tensors bound by name.

    Args:
        inputs: ``{name: tensor}`` on ``device`` (each shape within the engine's optimisation profile).
        device: the engine's CUDA device.

    Returns:
        Every output as a tensor on ``device``, in the engine's output dtype.

    Raises:
        RuntimeError: TensorRT reported a failed execution.
    """
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs: dict[str, torch.Tensor] = {}
    for name in engine_io(trt, engine)[1]:
        shape = tuple(context.get_tensor_shape(name))  # known once every input shape is set
        outputs[name] = torch.empty(shape, dtype=torch_dtype(trt, engine.get_tensor_dtype(name)), device=device)
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream(device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execute_async_v3 failed")
    stream.synchronize()
    return outputs
