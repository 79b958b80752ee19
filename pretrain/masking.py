"""Block-wise iBOT masks and the official collate (crop-major batches with stratified mask ratios).

Every random number comes from a ``random.Random`` passed in explicitly and is consumed in exactly the order
of the official ``MaskingGenerator`` and ``collate_data_and_cast`` (which use the global ``random`` module),
so seeding the same stream reproduces the official masks bit for bit. Pass ``random`` itself (the module)
to share the global stream as the official code does.

Batch layout (the dict :func:`collate_data_and_cast` returns and ``SSLMetaArch`` consumes):

* ``global_crops`` ``[2B, 3, G, G]``, row ``c * B + b`` = global crop c of image b;
* ``local_crops`` ``[n_local * B, 3, l, l]``, row ``j * B + b`` (``[0, 3, l, l]``-shaped when there are none);
* ``masks`` bool ``[2B, N]`` (True = the student sees ``mask_token``), ``mask_indices`` int64 ``[M]`` (the
  True positions of ``masks.flatten()``), ``masks_weight`` float32 ``[M]`` (1 / masked count of the crop),
  ``n_masked_patches`` int (M), ``upperbound`` int (the official padded-buffer length; unused by the loss).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol, TypedDict

import numpy as np
import torch

from dinoforge.core.errors import ConfigError, DataError


class RandomSource(Protocol):
    """What the generator needs from a ``random.Random`` (or the ``random`` module)."""

    def random(self) -> float: ...
    def uniform(self, a: float, b: float) -> float: ...
    def randint(self, a: int, b: int) -> int: ...
    def shuffle(self, x: list[Any]) -> None: ...


class Batch(TypedDict):
    """A collated training batch (see the module docstring for the layout)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor
    mask_indices: torch.Tensor
    masks_weight: torch.Tensor
    n_masked_patches: int
    upperbound: int


def official_max_num_patches(global_crops_size: int, patch_size: int) -> float:
    """The training script's rectangle cap: ``0.5 * size // patch * size // patch`` (left to right).

    That is ``floor(g / 2) * g`` for a g x g grid, less than half the grid for odd g (10 for 5x5).
    """
    return 0.5 * global_crops_size // patch_size * global_crops_size // patch_size


class MaskingGenerator:
    """Random union of axis-aligned rectangles covering (at most) a requested number of patches.

    Args:
        grid: ``(height, width)`` of the patch grid, or one int for a square grid.
        max_num_patches: cap on the *new* patches one rectangle may add (official: half the grid).
        min_num_patches: smallest rectangle area drawn (official 4).
        min_aspect: smallest aspect ratio; the largest is ``1 / min_aspect`` unless given.
        max_aspect: largest aspect ratio.
    """

    def __init__(self, grid: int | tuple[int, int], *, max_num_patches: float, min_num_patches: float = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        if min(self.height, self.width) < 1 or not 0 < min_aspect <= (max_aspect or 1 / min_aspect):
            raise ConfigError(f"masking: invalid grid {grid} or aspect range ({min_aspect}, {max_aspect})")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def _add_rectangle(self, mask: np.ndarray, max_new: float, rng: RandomSource) -> int:
        """Up to 10 attempts to add one rectangle bringing 1..max_new new patches; returns the count added."""
        uniform, randint, sqrt = rng.uniform, rng.randint, math.sqrt  # hot loop: bind once
        log_lo, log_hi = self.log_aspect_ratio
        for _ in range(10):
            area = uniform(self.min_num_patches, max_new)
            aspect = math.exp(uniform(log_lo, log_hi))
            h = int(round(sqrt(area * aspect)))
            w = int(round(sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = randint(0, self.height - h)
                left = randint(0, self.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - np.count_nonzero(window)
                if 0 < new <= max_new:
                    window[...] = True
                    return new  # the official loop stops at the first attempt that adds patches
        return 0

    def __call__(self, num_masking_patches: int = 0, *, rng: RandomSource = random) -> np.ndarray:
        """Draw one mask.

        Args:
            num_masking_patches: requested count t; the result has at most t patches (often slightly fewer).
            rng: random stream (``random.Random`` or the ``random`` module).

        Returns:
            bool ``[height, width]``.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_rectangle(mask, max_new, rng)
            if added == 0:
                break
            count += added
        return mask


def collate_masks(n_global_crops_total: int, generator: MaskingGenerator, *,
                  mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                  rng: RandomSource = random) -> dict[str, Any]:
    """The mask part of the official collate.

    ``int(2B * mask_probability)`` crops get stratified targets: with
    ``p = linspace(min, max, n + 1)`` (float32, as the official ``torch.linspace``), stratum i requests
    ``int(N * U(p_i, p_{i+1}))`` patches; the other crops are unmasked; the list is shuffled.

    Args:
        n_global_crops_total: 2B, rows of the result.
        generator: the block-mask generator for the global-crop patch grid.
        mask_ratio_min_max: ratio range split into strata.
        mask_probability: fraction of crops that get a mask.
        rng: random stream.

    Returns:
        ``masks`` bool ``[2B, N]``, ``mask_indices`` int64 ``[M]``, ``masks_weight`` float32 ``[M]``,
        ``n_masked_patches`` int, ``upperbound`` int.
    """
    lo, hi = mask_ratio_min_max
    if not (0 <= lo <= hi <= 1 and 0 <= mask_probability <= 1):
        raise ConfigError(f"masking: need 0 <= min ratio <= max ratio <= 1 and a probability in [0, 1]; got "
                          f"mask_ratio_min_max={mask_ratio_min_max}, mask_probability={mask_probability}")
    n_patches = generator.num_patches
    n_masked_crops = int(n_global_crops_total * mask_probability)
    probs = _strata(mask_ratio_min_max, n_masked_crops)
    masks: list[np.ndarray] = []
    for i in range(n_masked_crops):
        # ``random.uniform(a, b)`` is ``a + (b - a) * random()``: the same draw, done on float32 tensors
        # because the official targets are float32 products (``int`` truncates them).
        ratio = probs[i] + (probs[i + 1] - probs[i]) * rng.random()
        masks.append(generator(int(n_patches * ratio), rng=rng))
    masks += [generator(0, rng=rng) for _ in range(n_masked_crops, n_global_crops_total)]
    rng.shuffle(masks)
    stacked = torch.from_numpy(np.stack(masks)).flatten(1) if masks else torch.zeros(0, n_patches, dtype=torch.bool)
    upperbound = collate_upperbound(n_global_crops_total, n_patches, mask_ratio_min_max=mask_ratio_min_max,
                                    mask_probability=mask_probability)
    return {**mask_statistics(stacked), "upperbound": upperbound}


def _strata(mask_ratio_min_max: tuple[float, float], n_masked_crops: int) -> torch.Tensor:
    """Stratum boundaries ``[n + 1]``, float32 like the official ``torch.linspace`` (targets depend on it)."""
    return torch.linspace(*mask_ratio_min_max, n_masked_crops + 1)


def collate_upperbound(n_global_crops_total: int, n_patches: int, *,
                       mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5) -> int:
    """The official ``upperbound``: sum over masked strata of ``int(N * upper ratio)`` (deterministic)."""
    n_masked_crops = int(n_global_crops_total * mask_probability)
    probs = _strata(mask_ratio_min_max, n_masked_crops)
    return sum(int(n_patches * probs[i + 1]) for i in range(n_masked_crops))


def mask_statistics(masks: torch.Tensor) -> dict[str, Any]:
    """Derived mask tensors: ``masks`` ``[2B, N]`` -> indices, per-token weights and count (no upperbound)."""
    mask_indices = masks.flatten().nonzero().flatten()  # [M]
    per_crop = 1 / masks.sum(-1).clamp(min=1.0)  # [2B]
    masks_weight = per_crop.unsqueeze(-1).expand_as(masks)[masks]  # [M]
    return {"masks": masks, "mask_indices": mask_indices, "masks_weight": masks_weight,
            "n_masked_patches": int(mask_indices.shape[0])}


def collate_data_and_cast(samples: Sequence[dict[str, Sequence[torch.Tensor]]], *, generator: MaskingGenerator,
                          mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                          dtype: torch.dtype = torch.float32, rng: RandomSource = random) -> Batch:
    """Collate augmented samples into the crop-major batch the meta-architecture consumes.

    Args:
        samples: per image, ``{"global_crops": [2 x [3, G, G]], "local_crops": [n_local x [3, l, l]]}``.
        generator: block-mask generator for the global-crop grid.
        mask_ratio_min_max: see :func:`collate_masks`.
        mask_probability: see :func:`collate_masks`.
        dtype: dtype of the crops.
        rng: random stream for the masks.

    Returns:
        A :class:`Batch`.
    """
    if not samples:
        raise DataError("collate: empty list of samples")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    if n_global != 2 or any(len(s["global_crops"]) != 2 or len(s["local_crops"]) != n_local for s in samples):
        raise DataError(f"collate: every sample needs 2 global crops and the same number of local crops "
                        f"(first sample: {n_global} global, {n_local} local)")
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    if n_local:
        local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    else:
        local_crops = global_crops.new_zeros((0, *global_crops.shape[1:]))
    mask_part = collate_masks(len(global_crops), generator, mask_ratio_min_max=mask_ratio_min_max,
                              mask_probability=mask_probability, rng=rng)
    return Batch(global_crops=global_crops.to(dtype), local_crops=local_crops.to(dtype), **mask_part)
