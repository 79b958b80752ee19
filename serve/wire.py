"""Vector encodings on the wire (OpenAI's ``encoding_format``); numpy only, so the client needs no torch."""

from __future__ import annotations

import base64

import numpy as np


#: little-endian wire dtype of each ``patch_tokens_dtype`` / base64 payload
WIRE_DTYPES = {"float32": "<f4", "float16": "<f2"}
#: upper bound of one float32 in a JSON list ("-1.2345678901234567e-05,"), for response-size estimates
JSON_FLOAT_BYTES = 24


def encode_vector(vec: np.ndarray, encoding: str, dtype: str = "float32") -> list[float] | str:
    """One vector as a JSON list or as base64 of its little-endian bytes (OpenAI's format; float16 optional)."""
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype=WIRE_DTYPES[dtype]).tobytes()).decode("ascii")
    return np.asarray(vec, dtype=np.float32).tolist()


def encoded_bytes(n_floats: int, encoding: str, dtype: str = "float32") -> int:
    """Bytes :func:`encode_vector` produces for ``n_floats`` values (an upper bound for JSON lists)."""
    if encoding == "base64":
        return 4 * -(-n_floats * np.dtype(WIRE_DTYPES[dtype]).itemsize // 3)
    return n_floats * JSON_FLOAT_BYTES


def decode_vector(data: list[float] | str, dim: int | None = None, dtype: str = "float32") -> np.ndarray:
    """Inverse of :func:`encode_vector` (used by the client); ``dim`` reshapes patch-token matrices."""
    if isinstance(data, str):
        arr = np.frombuffer(base64.b64decode(data), dtype=WIRE_DTYPES[dtype]).astype(np.float32)
    else:
        arr = np.asarray(data, dtype=np.float32)
    return arr.reshape(-1, dim) if dim is not None and arr.ndim == 1 else arr
