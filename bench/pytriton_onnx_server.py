"""Serve an exported dinoforge ONNX graph with PyTriton (Triton's dynamic batcher + ONNX Runtime on CPU).

The Triton side of ``bench/bench_serve.py``. It runs inside ``.venv-triton`` (nvidia-pytriton pins numpy<2,
so it never goes into the project's .venv) and imports nothing from dinoforge. Prints ``READY`` once the
model is loaded, then serves until terminated.

Usage: .venv-triton/bin/python bench/pytriton_onnx_server.py MODEL.onnx --http-port P --grpc-port Q
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("onnx")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    args = parser.parse_args()

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    outputs = ["cls_embedding", "mean_embedding"]
    dim = session.get_outputs()[0].shape[-1]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(outputs, {inp.name: inputs[inp.name]})
        return dict(zip(outputs, values, strict=True))

    dtype = np.uint8 if "uint8" in inp.type else np.float32
    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port or args.http_port + 2, http_address="127.0.0.1",
                          grpc_address="127.0.0.1")
    with Triton(config=config) as triton:
        triton.bind(model_name="dinoforge", infer_func=infer,
                    inputs=[Tensor(name=inp.name, dtype=dtype, shape=tuple(inp.shape[1:]))],
                    outputs=[Tensor(name=n, dtype=np.float32, shape=(dim,)) for n in outputs],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)))
        print("READY", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
