"""Shared by the backends that run an *exported* graph (ONNX Runtime, TensorRT, Triton).

They all follow the I/O contract of ``docs/export.md`` (:mod:`dinoforge.core.onnx_contract`): one input
(``pixel_values`` float32 NCHW, normalised; or ``pixels`` uint8 NHWC with the normalisation inside the graph),
outputs ``cls_embedding [B, D]``, ``mean_embedding [B, D]`` and optionally ``patch_tokens [B, N, D]``, a
fixed square resolution per graph, and the artifact's card in the metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinoforge.core import preprocess_np
from dinoforge.core.card import ModelCard
from dinoforge.core.errors import ArtifactError
from dinoforge.core.onnx_contract import CLS_OUTPUT, MEAN_OUTPUT, PATCH_OUTPUT, parse_export_metadata
from dinoforge.core.image_contract import PreprocessConfig
from dinoforge.serve.backends.base import Backend, Features, ModelInfo


def contract_at(pre: PreprocessConfig, size: int) -> PreprocessConfig:
    """The card's preprocessing scaled to a square graph resolution (same crop ratio).

    ``patch_multiple`` contracts become a plain resize: an exported graph has one fixed input size.
    """
    if pre.mode == "center_crop":
        if pre.size == size:
            return pre
        ratio = (pre.resize_size or pre.size) / pre.size
        return pre.model_copy(update={"size": size, "resize_size": max(size, round(size * ratio))})
    if pre.mode == "resize" and pre.size == size:
        return pre
    return pre.model_copy(update={"mode": "resize", "size": size, "resize_size": None})


@dataclass(frozen=True)
class GraphContract:
    """What serving needs to know about one exported graph.

    Attributes:
        card: the artifact's model card.
        resolution: graph input side (square).
        input_name: ``pixel_values`` or ``pixels``.
        uint8_input: ``pixels`` mode (uint8 NHWC, normalisation inside the graph).
        outputs: output names the graph provides.
        precision: ``fp32`` / ``fp16`` / ``int8``.
    """

    card: ModelCard
    resolution: int
    input_name: str
    uint8_input: bool
    outputs: tuple[str, ...]
    precision: str = "fp32"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> GraphContract:
        """Parse the ``dinoforge.*`` metadata keys of a graph (ONNX ``metadata_props``)."""
        export, card = parse_export_metadata(meta, where)
        h, w = export["resolution"]
        if h != w:
            raise ArtifactError(f"{where} has a non-square input {h}x{w}; serving needs a square export "
                                "resolution (export with --resolutions N)")
        return cls(card=card, resolution=int(h), input_name=export["input_name"],
                   uint8_input=export.get("input_dtype") == "uint8", outputs=tuple(export["outputs"]),
                   precision=export.get("precision", "fp32"))

    def model_info(self, name: str | None = None) -> ModelInfo:
        """Serving view: the card with its preprocessing set to this graph's resolution."""
        card = self.card
        return ModelInfo(name=name or card.name, embed_dim=card.embed_dim,
                         preprocessing=contract_at(card.preprocessing, self.resolution),
                         default_pooling=card.default_pooling, weights_sha256=card.weights_sha256,
                         patch_size=card.architecture.patch_size)


class ExportedBackend(Backend):
    """Base of graph backends: uint8 / float input preparation and output unpacking."""

    def __init__(self, contract: GraphContract, name: str | None = None) -> None:
        super().__init__(contract.model_info(name))
        self.contract = contract

    def pre(self, image: Image.Image) -> np.ndarray:
        """float32 ``[3, H, W]`` normalised, or uint8 ``[3, H, W]`` pixels for graphs that normalise."""
        if not self.contract.uint8_input:
            return super().pre(image)
        # channel-first like every other backend input, so the engine batches one layout
        return preprocess_np.pixels_for_graph(image, self.info.preprocessing).transpose(2, 0, 1)

    def graph_input(self, pixels: np.ndarray) -> np.ndarray:
        """Engine batch ``[B, 3, H, W]`` -> the array the graph takes (NHWC uint8 or NCHW float32)."""
        if self.contract.uint8_input:
            return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1), dtype=np.uint8)
        return np.ascontiguousarray(pixels, dtype=np.float32)

    @property
    def output_names(self) -> list[str]:
        """Outputs to request: the embeddings, and patch tokens when the graph has them."""
        return [CLS_OUTPUT, MEAN_OUTPUT] + ([PATCH_OUTPUT] if self.has_patch_tokens else [])

    @property
    def has_patch_tokens(self) -> bool:
        return PATCH_OUTPUT in self.contract.outputs

    def features(self, outputs: Mapping[str, np.ndarray]) -> Features:
        """Graph outputs -> :class:`Features` (float32 arrays)."""
        def grab(name: str) -> np.ndarray:
            return np.asarray(outputs[name], dtype=np.float32)

        patch = grab(PATCH_OUTPUT) if self.has_patch_tokens else None
        return Features(cls=grab(CLS_OUTPUT), mean=grab(MEAN_OUTPUT), patch=patch)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        side = self.contract.resolution
        for b in batch_sizes:
            self.core(np.zeros((b, 3, side, side), dtype=np.uint8 if self.contract.uint8_input else np.float32))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "resolution": self.contract.resolution, "precision": self.contract.precision,
                "input": self.contract.input_name}
