"""Error types of the export stage (the CLI prints their message; see :mod:`dinoforge.core.errors`)."""

from __future__ import annotations

from dinoforge.core.errors import DinoforgeError


class ExportError(DinoforgeError):
    """An export cannot be produced from the given input (graph, options or environment)."""


class ParityFailure(DinoforgeError):
    """An exported graph missed a parity threshold; nothing was written."""

    exit_code = 1
