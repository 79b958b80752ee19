"""dinoforge.serve: HTTP serving of DINOv2-style backbones (embeddings, classification, retrieval).

Public API (imported lazily, so ``from dinoforge.serve import DinoforgeClient`` does not import torch)::

    from dinoforge.serve import create_app, ServeSettings, BackgroundServer     # server side
    from dinoforge.serve import DinoforgeClient, AsyncDinoforgeClient            # client side

See ``docs/serve.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "dinoforge.serve.app",
    "load_resources": "dinoforge.serve.app",
    "ServeSettings": "dinoforge.serve.settings",
    "BackgroundServer": "dinoforge.serve.server",
    "serve_forever": "dinoforge.serve.server",
    "create_backend": "dinoforge.serve.backends",
    "DinoforgeClient": "dinoforge.serve.client",
    "AsyncDinoforgeClient": "dinoforge.serve.client",
    "ClientError": "dinoforge.serve.client",
    "Embeddings": "dinoforge.serve.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinoforge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
