"""Settings of a batch extraction job (``dinoforge extract``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dinoforge.core.config import StrictModel

#: Features an extraction job can write. ``cls``/``mean``/``cls+mean`` are ``[D]`` (``[2D]``) per image,
#: ``patch`` is ``[N, D]`` (the normalised patch tokens, registers excluded); ``pixels`` is the preprocessed
#: image flattened (``--model pixels`` only: the raw-pixel baseline of ``dinoforge eval``).
FEATURES: tuple[str, ...] = ("cls", "mean", "cls+mean", "patch", "pixels")


class ExtractConfig(StrictModel):
    """What to extract, from what, into where.

    ``model``, ``input``, ``features``, ``dtype``, ``format``, ``shard_size`` and ``preprocess`` define the
    job: a restart with the same values resumes it; different values are refused (use a new output).
    """

    model: str = Field(..., description="artifact directory, checkpoint file, or 'pixels'")
    input: str = Field(..., description="data source spec: folder, manifest, WebDataset tars, fmnist:...")
    output: str = Field(..., description="output directory (created; resumed when it holds the same job)")
    shard_size: int = Field(10_000, ge=1, description="inputs per work unit / rows per output part")
    features: tuple[str, ...] = ("cls",)
    dtype: Literal["float16", "float32"] = "float16"
    format: Literal["npy", "safetensors"] = "npy"
    preprocess: tuple[str, ...] = Field((), description="KEY=VALUE overrides of the model's contract")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (decode + preprocess)")
    device: str = "cpu"
    autocast: Literal["bf16", "fp16"] | None = None
    progress: bool = True
    max_units: int | None = Field(None, ge=1, description="stop after this many units (time-sliced jobs)")

    @field_validator("features")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
        unknown = [v for v in value if v not in FEATURES]
        if unknown or not value:
            raise ValueError(f"unknown feature {unknown or list(value)}; choose from {', '.join(FEATURES)}")
        return value
