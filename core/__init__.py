"""dinoforge.core: the shared hallway of the toolkit.

Backbones, model artifacts, preprocessing, data sources, evaluation, faiss index helpers and configs. It
imports no stage (``pretrain``, ``distill``, ``export``, ``serve``); stages hand each other files.
Importing this package is cheap (no torch); import the submodules you need.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinoforge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
