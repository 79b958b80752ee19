"""Serving backends behind one interface (``pre`` / ``core`` / ``post``), chosen by :func:`create_backend`.

``auto`` picks by what ``--model`` points at: an artifact directory -> ``torch``; an ``.onnx`` file or a
``dinoforge export onnx`` folder -> ``onnxruntime``; a TensorRT engine (``.plan`` / ``.engine``) -> ``tensorrt``;
``--triton-url`` given -> ``triton``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dinoforge.core.card import WEIGHTS_FILE, is_artifact
from dinoforge.core.errors import ConfigError
from dinoforge.serve.backends.base import Backend, Features, ModelInfo

if TYPE_CHECKING:
    from dinoforge.serve.settings import ServeSettings

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def resolve_backend_name(settings: ServeSettings) -> str:
    """The concrete backend ``auto`` stands for."""
    if settings.backend != "auto":
        return settings.backend
    if settings.triton_url:
        return "triton"
    model = settings.model
    if model is None:
        raise ConfigError("no --model given")
    if is_artifact(model) and (model / WEIGHTS_FILE).is_file():  # export folders carry model.json too
        return "torch"
    if model.suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if model.suffix == ".onnx" or (model.is_dir() and any(model.glob("*.onnx"))):
        return "onnxruntime"
    if not model.exists():
        raise ConfigError(f"--model {model} does not exist")
    raise ConfigError(f"cannot tell which backend serves {model}: expected an artifact directory, an .onnx file "
                      "or export folder, or a TensorRT engine (or pass --backend)")


def create_backend(settings: ServeSettings) -> Backend:
    """Instantiate the backend described by ``settings`` (loads the model).

    Raises:
        ConfigError / ArtifactError / MissingDependencyError: with a message that says what to fix.
    """
    name = resolve_backend_name(settings)
    if name == "fake":
        from dinoforge.serve.backends.fake import FakeBackend

        return FakeBackend()
    if name == "triton":
        from dinoforge.serve.backends.triton_backend import TritonBackend

        if settings.model is None:
            raise ConfigError("the triton backend needs --model: the Triton model folder, the ONNX export or "
                              "the artifact it was made from (for the model card)")
        return TritonBackend(settings.triton_url or "", settings.triton_model or "", card_source=settings.model,
                             protocol=settings.triton_protocol, timeout_s=settings.request_timeout_s,
                             name=settings.model_name)
    if settings.model is None:
        raise ConfigError("no --model given")
    if not Path(settings.model).exists():
        raise ConfigError(f"--model {settings.model} does not exist")
    if name == "torch":
        from dinoforge.serve.backends.torch_backend import TorchBackend

        return TorchBackend.from_artifact(settings.model, device=settings.device, name=settings.model_name,
                                          threads=settings.torch_threads)
    if name == "onnxruntime":
        from dinoforge.serve.backends.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(settings.model, providers=settings.onnx_providers or None,
                                  intra_op_threads=settings.intra_op_threads or settings.torch_threads,
                                  name=settings.model_name)
    if name == "tensorrt":
        from dinoforge.serve.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_path(settings.model, device=settings.device, name=settings.model_name)
    raise ConfigError(f"unknown backend {name!r}")


__all__ = ["Backend", "Features", "ModelInfo", "create_backend", "resolve_backend_name"]
