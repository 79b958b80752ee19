"""Triton Python-backend model that runs a dinoforge ONNX export with onnxruntime.

``dinoforge export triton --backend python`` copies this file to ``REPO/NAME/<version>/model.py`` next to
``model.onnx``. It runs inside Triton's Python stub (``triton_python_backend_utils`` is provided there), so it
is never imported by dinoforge itself. Requests arrive already batched by Triton's dynamic batcher; they are
concatenated into one onnxruntime call and split back per request.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Serve ``model.onnx`` of this version directory."""

    def initialize(self, args: dict) -> None:
        """Load the graph; input/output names come from the model config."""
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one instance per core; scale with instance_group count
        # as dinoforge.core.ort_session does for CPU sessions (this file runs without dinoforge installed):
        # ONNX Runtime's CPU SkipLayerNormalization kernel is slower than the Add + LayerNorm it would replace
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["SkipLayerNormFusion"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        """Run every request of the batch in one onnxruntime call."""
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(arrays)})
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, out[start:start + size])
                       for name, out in zip(self.output_names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
