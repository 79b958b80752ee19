"""The pretraining building blocks another run may assemble: the public surface of pretraining for runs.

A run plugged into the generic trainer (:mod:`dinoforge.pretrain.spec`) builds its model and batches from
these pieces; distillation uses pretraining only through this module, :mod:`~dinoforge.pretrain.spec` and
:mod:`~dinoforge.pretrain.trainer`, so everything else in the package stays free to change.

* recipe sections shared by every run (crops, masking, data, optimizer, schedules, spikes, ...);
* the data pipeline: deterministic multi-crop batches over a data source, iBOT masks;
* the DINOv2 objective: ``SSLMetaArch`` (teacher targets, student pass, losses), centring, crop swap;
* parallelism (``parallelize``: DDP / FSDP2), the teacher's health indicators, k-NN monitor, artifact helpers.
"""

from __future__ import annotations

from dinoforge.pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, CropsConfig
from dinoforge.pretrain.config import (
    ArtifactConfig,
    CheckpointConfig,
    DataConfig,
    KnnConfig,
    MaskingConfig,
    MonitorConfig,
    TrainConfig,
)
from dinoforge.pretrain.data import BatchLayout, PretrainBatches
from dinoforge.pretrain.knn_monitor import KnnMonitor
from dinoforge.pretrain.losses import Centering, swap_global_crops
from dinoforge.pretrain.masking import Batch, MaskingGenerator, mask_statistics, official_max_num_patches
from dinoforge.pretrain.meta_arch import Centres, HeadShape, MetaArchConfig, SSLMetaArch, TeacherOutput
from dinoforge.pretrain.monitor import collapse_indicators
from dinoforge.pretrain.optim import OptimConfig, clip_grad_norms
from dinoforge.pretrain.parallelize import ParallelConfig, parallelize
from dinoforge.pretrain.schedules import ScheduleConfig
from dinoforge.pretrain.sources import open_pretrain_source
from dinoforge.pretrain.spikes import SpikeConfig
from dinoforge.pretrain.teacher_export import PlainTeacher, default_preprocess

__all__ = [
    # recipe sections
    "ArtifactConfig", "CheckpointConfig", "CropsConfig", "DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "KnnConfig",
    "MaskingConfig", "MonitorConfig", "OptimConfig", "ParallelConfig", "ScheduleConfig", "SpikeConfig", "TrainConfig",
    # data pipeline
    "Batch", "BatchLayout", "MaskingGenerator", "PretrainBatches", "mask_statistics", "official_max_num_patches",
    "open_pretrain_source",
    # DINOv2 objective
    "Centering", "Centres", "HeadShape", "MetaArchConfig", "SSLMetaArch", "TeacherOutput", "clip_grad_norms",
    "swap_global_crops",
    # parallelism, monitoring, artifacts
    "KnnMonitor", "PlainTeacher", "collapse_indicators", "default_preprocess", "parallelize",
]
