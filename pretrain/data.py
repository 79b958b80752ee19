"""Deterministic, resumable, rank-invariant pretraining batches.

Every batch is a pure function of ``(seed, data_step)``:

* **Sampling.** The dataset is read as an endless stream. Data step ``t`` takes stream positions
  ``[t*G, (t+1)*G)`` where ``G`` is the *global* batch (micro-batch x accumulation x world size). Indexed
  sources map position to row by a per-epoch order seeded by ``(seed, e)`` (block-wise beyond 2^20 rows, so
  no process holds an index array of the whole dataset: :mod:`dinoforge.core.data.order`); WebDataset shards
  map it to a sample of one of ``V`` shard streams (:mod:`dinoforge.core.data.stream`). Resuming needs only
  ``t``, on any number of ranks, as long as ``G`` is kept.
* **Sharding.** Position ``j`` of a global batch belongs to rank ``r``, micro-batch ``m`` when
  ``j // Bm == r * accum + m``: a rank reads only its own slice, and 1 process with 2 micro-batches reads
  exactly what 2 processes with 1 micro-batch read.
* **Augmentation.** The uniforms that drive every crop (:mod:`.augment`) are drawn for the whole global
  batch from a generator seeded by ``(seed, t)`` and sliced, so crops do not depend on the rank, the
  DataLoader worker or a restart.
* **Masks.** iBOT masks are drawn for all ``2G`` global crops of the global batch (official stratified
  collate, a ``random.Random`` seeded by ``(seed, t)``) and sliced per rank, so the masked/unmasked pattern is
  the same whatever the world size.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dinoforge.core.data.order import DEFAULT_BLOCK_SIZE, EpochOrder
from dinoforge.pretrain.augment import SLOTS, CropsConfig, MultiCropAugmentation
from dinoforge.pretrain.masking import MaskingGenerator, collate_masks, mask_statistics
from dinoforge.pretrain.sources import PretrainSource, PretrainStream

Batch = dict[str, object]

_STREAM_AUG, _STREAM_MASK, _STREAM_PERM = 1, 2, 3


@dataclass(frozen=True)
class BatchLayout:
    """Sizes of one optimisation step.

    Args:
        micro_batch: images per micro-batch per rank (``Bm``).
        accum: micro-batches per step (gradient accumulation).
        world_size: data-parallel ranks.
        rank: this rank.
    """

    micro_batch: int
    accum: int = 1
    world_size: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        """Images per optimisation step over all ranks."""
        return self.micro_batch * self.accum * self.world_size

    def micro_slice(self, micro: int) -> slice:
        """Rows of the global batch that micro-batch ``micro`` of this rank holds."""
        start = (self.rank * self.accum + micro) * self.micro_batch
        return slice(start, start + self.micro_batch)


class StreamSampler(EpochOrder):
    """Endless stream of dataset indices: one seeded order per epoch (or the identity).

    An :class:`~dinoforge.core.data.order.EpochOrder` keyed to the pretraining stream: a plain permutation up to
    ``block_size`` rows (the order this sampler always gave), block-wise beyond.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(n, seed=seed, shuffle=shuffle, block_size=block_size, key=[_STREAM_PERM])


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


class PretrainBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``t`` is this rank's list of micro-batches for data step ``t``.

    Args:
        source: images.
        crops: multi-crop parameters.
        layout: batch sizes and this rank's place.
        mask_generator: block-mask generator for the global-crop patch grid.
        mask_ratio: iBOT mask ratio range.
        mask_probability: fraction of global crops that get masks.
        seed: run seed.
    """

    def __init__(self, source: PretrainSource | PretrainStream, crops: CropsConfig, layout: BatchLayout, *,
                 mask_generator: MaskingGenerator, mask_ratio: tuple[float, float], mask_probability: float,
                 seed: int) -> None:
        self.source, self.crops, self.layout = source, crops, layout
        self.augment = MultiCropAugmentation(crops)
        # Indexed sources map stream positions to rows here; shard streams map them to (stream, sample) themselves.
        self.sampler = StreamSampler(len(source), seed=seed) if isinstance(source, PretrainSource) else None
        if isinstance(source, PretrainStream):
            source.bind(seed=seed, global_batch=layout.global_batch)
        self.mask_generator = mask_generator
        self.mask_ratio, self.mask_probability, self.seed = mask_ratio, mask_probability, seed

    def __len__(self) -> int:  # steps are unbounded; DataLoader samplers give the range
        return 2**62

    def global_masks(self, step: int) -> tuple[torch.Tensor, int]:
        """bool ``[2, G, N]`` masks of the whole global batch of ``step`` (crop-major) and the upperbound."""
        g = self.layout.global_batch
        rng = random.Random(_seed_int(self.seed, _STREAM_MASK, step))
        out = collate_masks(2 * g, self.mask_generator, mask_ratio_min_max=self.mask_ratio,
                            mask_probability=self.mask_probability, rng=rng)
        return out["masks"].view(2, g, -1), out["upperbound"]

    def __getitem__(self, step: int) -> list[Batch]:
        lay = self.layout
        g = lay.global_batch
        positions = np.arange(step * g, (step + 1) * g, dtype=np.int64)  # [G] global stream positions
        indices = self.sampler.indices_at(positions) if self.sampler is not None else positions  # [G]
        rng = np.random.default_rng([self.seed, _STREAM_AUG, step])
        uniforms = rng.random((g, self.crops.n_crops, SLOTS))  # [G, n_crops, SLOTS] drawn for all ranks
        masks, upperbound = self.global_masks(step)
        out = []
        for micro in range(lay.accum):
            rows = lay.micro_slice(micro)
            images = self.source.images(indices[rows])
            global_crops, local_crops = self.augment(images, uniforms[rows])  # [2, Bm, ...], [nL, Bm, ...]
            batch: Batch = {
                "global_crops": global_crops.flatten(0, 1),  # [2*Bm, 3, G, G] crop-major
                "local_crops": local_crops.flatten(0, 1),  # [nL*Bm, 3, l, l]
                "upperbound": upperbound,
                "indices": torch.from_numpy(indices[rows]),
                "data_step": step,
            }
            batch.update(mask_statistics(masks[:, rows].flatten(0, 1)))  # masks [2*Bm, N] and indices
            out.append(batch)
        return out


def _ignore_stop_signals(_: int) -> None:
    # A preemption signal sent to the whole process group must reach only the trainer, which finishes its
    # step, checkpoints and then shuts the workers down; a worker dying first would crash the trainer.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_loader(dataset: PretrainBatches, *, start: int, stop: int, num_workers: int) -> Iterator[list[Batch]]:
    """Iterate data steps ``[start, stop)`` with ``num_workers`` background processes (order preserved)."""
    if num_workers == 0:
        for step in range(start, stop):
            yield dataset[step]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop),
                                         num_workers=num_workers, prefetch_factor=2, persistent_workers=False,
                                         worker_init_fn=_ignore_stop_signals)
    yield from loader
