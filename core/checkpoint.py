"""Loading backbones from any supported file: official DINOv2 ``.pth``, timm checkpoints, our artifacts.

Pickled checkpoints are read with ``torch.load(..., weights_only=True)`` only: an untrusted file can never
execute code. The architecture is inferred from the tensors (see
:func:`~dinoforge.core.backbone.convert.infer_config`), with overrides for what shapes cannot tell.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dinoforge.core.artifact import is_artifact, load_artifact
from dinoforge.core.backbone import DinoVisionTransformer
from dinoforge.core.backbone.convert import SourceFormat, check_state_dict, detect_format, infer_config, \
    strip_wrapper_prefix, to_dinoforge
from dinoforge.core.errors import CheckpointError
from dinoforge.core.fileio import sha256_file

StateDict = dict[str, torch.Tensor]
_NESTED_KEYS = ("model", "state_dict", "teacher", "student", "model_ema", "module")


@dataclass
class LoadedBackbone:
    """A backbone read from a file, with what is known about where it came from."""

    backbone: DinoVisionTransformer
    source_format: SourceFormat
    sha256: str
    path: Path


def read_state_dict(path: str | Path) -> StateDict:
    """Read a flat tensor dict from ``.pth``/``.pt``/``.bin`` (safe unpickling) or ``.safetensors``.

    Nested checkpoints (``{"model": ...}``, ``{"teacher": ...}``) are unwrapped.

    Raises:
        CheckpointError: missing, truncated, corrupt or non-tensor files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} contains objects other than tensors and is refused "
                              f"(only weights_only checkpoints are loaded): {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: {err}") from err
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def backbone_from_state_dict(state: StateDict, *, num_heads: int | None = None, patch_size: int | None = None,
                             arch: str | None = None) -> tuple[DinoVisionTransformer, SourceFormat]:
    """Build and load a backbone from an official/timm/dinoforge state dict (architecture inferred)."""
    stripped = strip_wrapper_prefix(dict(state))
    fmt = detect_format(stripped)
    converted = to_dinoforge(stripped, fmt)
    config = infer_config(converted, num_heads=num_heads, patch_size=patch_size, arch=arch)
    model = DinoVisionTransformer(config)
    check_state_dict(converted, model.state_dict())
    model.load_state_dict(converted)
    return model.eval(), fmt


def load_backbone(path: str | Path, *, num_heads: int | None = None, patch_size: int | None = None,
                  arch: str | None = None) -> LoadedBackbone:
    """Load a backbone from an artifact directory or a checkpoint file, in eval mode on CPU."""
    path = Path(path)
    if path.is_dir():
        if not is_artifact(path):
            raise CheckpointError(f"{path} is a directory but not a model artifact (no model.json)")
        art = load_artifact(path, load_heads=False)
        return LoadedBackbone(art.backbone, "dinoforge", art.sha256, path)
    model, fmt = backbone_from_state_dict(read_state_dict(path), num_heads=num_heads, patch_size=patch_size,
                                          arch=arch)
    return LoadedBackbone(model, fmt, sha256_file(path), path)
