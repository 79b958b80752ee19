"""Frozen teachers of any architecture: torchvision or timm networks from a local state dict, ONNX models.

These teachers are not dinoforge ViTs, so they have no CLS or patch tokens of their own. Each one is wrapped
so that feature-mode distillation (:mod:`.meta`) sees what a ViT teacher gives it:

* ``x_norm_clstoken`` ``[B, D]``: the teacher's pooled embedding (what its classifier reads: global average
  of the last feature map for CNNs, timm's ``pre_logits`` for timm models);
* ``x_norm_patchtokens`` ``[B, h*w, D]``: its last spatial feature map, row-major, on the grid a ViT with
  :attr:`TeacherGeometry.patch_size` would have on the same view (a CNN's own grid, area-resampled when the
  two differ). Teachers without a spatial map (an ONNX model with only a pooled output) repeat the pooled
  vector, which is only allowed when the patch-loss weights are 0.

Function matching: the teacher sees exactly the student's augmented view (same crop, flip, colour). The view
arrives normalised with the recipe's ``crops.mean/std``; the wrapper undoes that, applies the teacher's own
``preprocess.mean/std`` and resizes the view by ``preprocess.size / crops.global_crops_size`` (local crops by
the same factor), so each model gets the input it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.core.errors import CheckpointError, ConfigError
from dinoforge.core.ort_session import create_session
# The weights-file helpers live in core (the curation stage uses them too); re-exported for distill's modules.
from dinoforge.core.pretrained_cnn import (inference_ready, load_strict, locate_weights,  # noqa: F401
                                           read_state_dict, rename_by_order)
from dinoforge.distill.grid import resample_tokens


@dataclass(frozen=True)
class TeacherGeometry:
    """What students need to know about an external teacher.

    Attributes:
        embed_dim: width D of pooled and spatial features (the adaptor's output width).
        patch_size: pixels of the *student's view* per spatial cell (the teacher's stride divided by its
            resize factor), so grids compare as between two ViTs.
    """

    embed_dim: int
    patch_size: int


@dataclass(frozen=True)
class ViewNorm:
    """How the shared views arrive: normalised with ``mean/std``, global crops ``size`` pixels a side."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int



class ExternalTeacher(nn.Module):
    """A frozen non-dinoforge teacher behind the interface feature distillation uses.

    Subclasses implement :meth:`_run` (teacher-normalised, teacher-sized images -> pooled and spatial
    features). Construction probes one global view to learn the width and the grid.

    Args:
        views: how views arrive (normalisation and global crop size).
        mean, std: the teacher's own input normalisation.
        size: teacher input side for a global view.

    Attributes:
        config: :class:`TeacherGeometry`.
        forward_passes: teacher passes so far (one per crop group).
        has_spatial: whether the teacher has a spatial feature map.
    """

    head_names: tuple[str, ...] = ()

    def __init__(self, views: ViewNorm, mean: Sequence[float], std: Sequence[float], size: int) -> None:
        super().__init__()
        self.views, self.size = views, size
        self.scale = size / views.size
        view_mean, view_std = torch.tensor(views.mean), torch.tensor(views.std)
        own_mean, own_std = torch.tensor(list(mean)), torch.tensor(list(std))
        # x_teacher = (x_view * std_v + mean_v - mean_t) / std_t = x_view * gain + bias, per channel
        self.register_buffer("gain", (view_std / own_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bias", ((view_mean - own_mean) / own_std).view(1, 3, 1, 1), persistent=False)
        self.forward_passes = 0
        self.config = TeacherGeometry(embed_dim=0, patch_size=1)
        self.has_spatial = True

    def _probe(self) -> None:
        """Learn width, stride and whether a spatial map exists from one zero image of global size."""
        pooled, spatial = self._run(torch.zeros(1, 3, self.size, self.size))
        self.has_spatial = spatial is not None
        grid = spatial.shape[-1] if spatial is not None else 1
        stride = self.size / grid
        patch = stride / self.scale
        if spatial is not None and not math.isclose(patch, round(patch)):
            raise ConfigError(f"teacher stride {stride:g} px at input {self.size} px is {patch:g} px of a "
                              f"{self.views.size} px view, not a whole number; choose teacher.preprocess.size so "
                              "that crops.global_crops_size * stride / size is an integer")
        self.config = TeacherGeometry(embed_dim=int(pooled.shape[-1]),
                                      patch_size=round(patch) if spatial is not None else self.views.size)

    def train(self, mode: bool = True) -> ExternalTeacher:
        """The teacher always stays in eval mode (batch-norm statistics frozen)."""
        return super().train(False)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-ready ``[B, 3, S, S]`` -> pooled ``[B, D]`` and spatial ``[B, D, h, w]`` (or ``None``)."""
        raise NotImplementedError

    def prepare(self, crops: torch.Tensor) -> torch.Tensor:
        """Views normalised for the student ``[B, 3, H, W]`` -> the teacher's input ``[B, 3, sH, sW]``."""
        images = crops.float() * self.gain + self.bias
        side = (round(crops.shape[-2] * self.scale), round(crops.shape[-1] * self.scale))
        if side == tuple(crops.shape[-2:]):
            return images
        return F.interpolate(images, size=side, mode="bilinear", align_corners=False, antialias=self.scale < 1)

    @torch.no_grad()
    def features(self, crops: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Pooled and spatial features of each crop group, float32.

        Args:
            crops: groups ``[B_g, 3, H_g, W_g]`` normalised like the student's views.

        Returns:
            Per group ``{"x_norm_clstoken": [B_g, D], "x_norm_patchtokens": [B_g, h*w, D]}`` with
            ``(h, w) = (H_g, W_g) // config.patch_size``.
        """
        out = []
        for group in crops:
            self.forward_passes += 1
            pooled, spatial = self._run(self.prepare(group))
            grid = (group.shape[-2] // self.config.patch_size, group.shape[-1] // self.config.patch_size)
            if spatial is None:
                tokens = pooled[:, None, :].expand(-1, grid[0] * grid[1], -1)  # [B, h*w, D], constant map
            else:
                tokens = spatial.flatten(2).transpose(1, 2)  # [B, h'*w', D]
                tokens = resample_tokens(tokens, tuple(spatial.shape[-2:]), grid, "area")
            out.append({"x_norm_clstoken": pooled.float(), "x_norm_patchtokens": tokens.float()})
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` of teacher-normalised images already at the teacher's size (evaluation)."""
        with torch.no_grad():
            return self._run(images)[0].float()


class TorchTeacher(ExternalTeacher):
    """A torchvision or timm network; pooled = what the classifier reads, spatial = the last feature map."""

    def __init__(self, model: nn.Module, family: str, views: ViewNorm, mean: Sequence[float],
                 std: Sequence[float], size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(views, mean, std, size)
        self.family, self.dtype = family, dtype
        self.model = inference_ready(model.requires_grad_(False).eval()).to(dtype)
        self._probe()

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.to(self.dtype).contiguous(memory_format=torch.channels_last)
        if self.family == "timm":
            feats = self.model.forward_features(x)
            pooled = self.model.forward_head(feats, pre_logits=True)
            spatial = feats if feats.ndim == 4 else None  # ViT tokens: pooled only (prefix tokens vary)
        else:
            spatial = torchvision_feature_map(self.model, x)
            pooled = spatial.mean(dim=(2, 3))  # [B, D], torchvision's adaptive average pool
        return pooled.float(), None if spatial is None else spatial.float()


def torchvision_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last spatial feature map ``[B, D, h, w]`` of a torchvision CNN (``features`` or ResNet layers)."""
    if hasattr(model, "features"):
        return model.features(x)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


class OnnxTeacher(ExternalTeacher):
    """An ONNX model run by onnxruntime: the first 2-D output is pooled, the first 4-D output spatial."""

    def __init__(self, path: Path, views: ViewNorm, mean: Sequence[float], std: Sequence[float],
                 size: int) -> None:
        super().__init__(views, mean, std, size)
        try:
            self.session = create_session(path)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own family for bad files
            raise CheckpointError(f"teacher.weights {path} is not a loadable ONNX model: {err}") from None
        self.input_name = self.session.get_inputs()[0].name
        ranks = {o.name: len(o.shape) for o in self.session.get_outputs()}
        self.pooled_name = next((n for n, r in ranks.items() if r == 2), None)
        self.spatial_name = next((n for n, r in ranks.items() if r == 4), None)
        if self.pooled_name is None and self.spatial_name is None:
            raise ConfigError(f"ONNX teacher {path}: no [B, D] or [B, D, h, w] output (outputs: {ranks})")
        self._probe()

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        names = [n for n in (self.pooled_name, self.spatial_name) if n is not None]
        arrays = self.session.run(names, {self.input_name: images.float().numpy()})
        found = dict(zip(names, (torch.from_numpy(np.asarray(a)) for a in arrays), strict=True))
        spatial = found.get(self.spatial_name) if self.spatial_name else None
        pooled = found[self.pooled_name] if self.pooled_name else spatial.mean(dim=(2, 3))  # type: ignore[union-attr]
        return pooled.float(), spatial
