"""Vector encodings on the wire (OpenAI's ``encoding_format``); numpy only, so the client needs no torch."""

from __future__ import annotations

import base64

import numpy as np


def encode_vector(vec: np.ndarray, encoding: str) -> list[float] | str:
    """One float32 vector as a JSON list or as base64 of its little-endian bytes (OpenAI's format)."""
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vec, dtype=np.float32).tolist()


def decode_vector(data: list[float] | str, dim: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode_vector` (used by the client); ``dim`` reshapes patch-token matrices."""
    if isinstance(data, str):
        arr = np.frombuffer(base64.b64decode(data), dtype="<f4").astype(np.float32)
    else:
        arr = np.asarray(data, dtype=np.float32)
    return arr.reshape(-1, dim) if dim is not None and arr.ndim == 1 else arr
