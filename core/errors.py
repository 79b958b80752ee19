"""Error types that carry a message meant for the user.

Every stage raises a subclass of :class:`DinoforgeError` for bad input (a missing file, a malformed
checkpoint, an unknown config key). The CLI prints the message and exits with status 2; the HTTP server
maps the same errors to 4xx responses. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class DinoforgeError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""

    exit_code: int = 2


class ConfigError(DinoforgeError):
    """A recipe or override names an unknown key or holds an invalid value."""


class CheckpointError(DinoforgeError):
    """A checkpoint file is unreadable, truncated, or does not fit the architecture."""


class ArtifactError(DinoforgeError):
    """A model artifact directory is missing files or its card does not match its weights."""


class ImageDecodeError(DinoforgeError):
    """Bytes that are not a decodable image, or an image beyond the configured limits."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose decoded size exceeds the pixel limit (decompression-bomb guard)."""


class DataError(DinoforgeError):
    """A data source that cannot be opened (missing folder, unreadable manifest, bad shard)."""


class MissingDependencyError(DinoforgeError):
    """An optional dependency (e.g. ``tensorrt``) that the requested feature needs is not installed."""
