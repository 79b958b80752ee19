"""dinoforge.export: ONNX (fp32/fp16/int8), TensorRT engines and Triton repositories, gated by parity.

Modules: ``contract`` (the I/O contract serving relies on), ``graph`` (fixed-resolution exportable ViT),
``onnx_export`` / ``quantize`` / ``pipeline`` (``dinoforge export onnx``), ``parity*`` (reports),
``trt_ops`` / ``trt_lint`` (``check-trt``), ``tensorrt_build`` / ``tensorrt_runtime`` (``tensorrt``),
``triton_repo`` / ``triton_server`` / ``triton_python_model`` (``triton``). See ``docs/export.md``.
"""
