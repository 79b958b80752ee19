"""Evaluate one exported graph: parity vs PyTorch at batch 16 and 1, k-NN agreement, size and CPU speed."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from dinoforge.core.artifact import Artifact
from dinoforge.core.onnx_contract import CLS_OUTPUT, EMBEDDING_OUTPUTS, MEAN_OUTPUT
from dinoforge.core.ort_session import create_session
from dinoforge.core.pooling import pool
from dinoforge.core.preprocess import PreprocessConfig
from dinoforge.export.parity import compare, knn_report, reference_outputs, run_session, time_session
from dinoforge.export.parity_data import ParityInputs, pixels_to_input, to_pixels

BATCH = 16
BATCH1_IMAGES = 4


def graph_inputs(images: list[torch.Tensor], pre: PreprocessConfig, hw: tuple[int, int], embed: bool) -> np.ndarray:
    """Images -> the graph's input array: uint8 ``[N, H, W, 3]`` (embedded preprocessing) or float ``[N, 3, H, W]``."""
    pixels = to_pixels(images, pre, hw)
    return np.ascontiguousarray((pixels if embed else pixels_to_input(pixels, pre)).numpy())


def session_for(model: onnx.ModelProto, threads: int = 0) -> Any:
    """A CPU onnxruntime session for an in-memory graph (``threads`` 0: onnxruntime's default)."""
    return create_session(model.SerializeToString(), threads=threads)


def _parity_runs(session: Any, inputs: np.ndarray, ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    out16 = run_session(session, inputs, BATCH)
    out1 = run_session(session, inputs[:BATCH1_IMAGES], 1)
    section: dict[str, Any] = {
        "batch16": {k: compare(out16[k], ref[k]) for k in EMBEDDING_OUTPUTS},
        "batch1": {k: compare(out1[k], ref[k][:BATCH1_IMAGES]) for k in EMBEDDING_OUTPUTS},
    }
    # Batch independence: the same image must give the same embedding alone or inside a batch.
    section["batch1_vs_batch16_max_abs"] = max(
        float((out1[k] - out16[k][:BATCH1_IMAGES]).abs().max()) for k in EMBEDDING_OUTPUTS)
    return section


def _embed(art: Artifact, session: Any, feed: np.ndarray) -> torch.Tensor:
    """Pooled embeddings ``[N, D']`` of a graph (the card's default pooling)."""
    out = run_session(session, feed, BATCH)
    return pool(out[CLS_OUTPUT], out[MEAN_OUTPUT], art.card.default_pooling)


def _knn_inputs(art: Artifact, data: ParityInputs, hw: tuple[int, int], embed: bool
                ) -> tuple[np.ndarray, torch.Tensor, int]:
    """Graph feed and reference input of the k-NN index + queries (concatenated), and the index size."""
    assert data.knn is not None
    pre = art.card.preprocessing
    train_images, _, test_images, _ = data.knn
    pixels = to_pixels(train_images + test_images, pre, hw)
    x_ref = pixels_to_input(pixels, pre)
    return np.ascontiguousarray((pixels if embed else x_ref).numpy()), x_ref, len(train_images)


def _knn(art: Artifact, session: Any, feed: np.ndarray, x_ref: torch.Tensor, n_index: int,
         data: ParityInputs) -> dict[str, Any]:
    assert data.knn is not None
    ours = _embed(art, session, feed)
    ref_out = reference_outputs(art.backbone, x_ref, BATCH)
    ref = pool(ref_out[CLS_OUTPUT], ref_out[MEAN_OUTPUT], art.card.default_pooling)
    return knn_report((ours[:n_index], ours[n_index:]), (ref[:n_index], ref[n_index:]), data.knn[1], data.knn[3])


def evaluate_graph(art: Artifact, model: onnx.ModelProto, fp32_model: onnx.ModelProto | None,
                   hw: tuple[int, int], data: ParityInputs, *, embed: bool) -> dict[str, Any]:
    """All metrics of one graph (see docs/export.md, "Parity report").

    Args:
        art: the artifact (reference backbone).
        model: the exported graph.
        fp32_model: for int8, the fp32 graph it was quantized from (size/speed/accuracy baseline).
        hw: resolution of the graph.
        data: decoded parity / k-NN images.
        embed: the graph takes raw uint8 pixels.
    """
    pre = art.card.preprocessing
    pixels = to_pixels(data.images, pre, hw)  # [N, H, W, 3] uint8
    x_ref = pixels_to_input(pixels, pre)  # [N, 3, H, W]
    feed = np.ascontiguousarray((pixels if embed else x_ref).numpy())
    session = session_for(model)
    section: dict[str, Any] = {"resolution": list(hw), "images": len(data.images)}
    section.update(_parity_runs(session, feed, reference_outputs(art.backbone, x_ref, BATCH)))
    section["bytes"] = model.ByteSize()
    section["speed"] = time_session(session, feed, BATCH)
    knn_feed, n_index = None, 0
    if data.knn is not None:
        knn_feed, knn_ref, n_index = _knn_inputs(art, data, hw, embed)
        section["knn"] = _knn(art, session, knn_feed, knn_ref, n_index, data)
    if fp32_model is not None:
        section["fp32_baseline"] = _fp32_baseline(art, fp32_model, feed, section, data, knn_feed, n_index)
    return section


def _fp32_baseline(art: Artifact, fp32_model: onnx.ModelProto, feed: np.ndarray, section: dict[str, Any],
                   data: ParityInputs, knn_feed: np.ndarray | None, n_index: int) -> dict[str, Any]:
    """Size, speed and k-NN accuracy of the fp32 graph an int8 graph came from, and the ratios."""
    session = session_for(fp32_model)
    base: dict[str, Any] = {"bytes": fp32_model.ByteSize(), "speed": time_session(session, feed, BATCH)}
    base["size_ratio"] = section["bytes"] / base["bytes"]
    base["speedup"] = section["speed"]["images_per_s"] / base["speed"]["images_per_s"]
    if knn_feed is not None and data.knn is not None:
        emb = _embed(art, session, knn_feed)
        split = (emb[:n_index], emb[n_index:])
        fp32_acc = knn_report(split, split, data.knn[1], data.knn[3])["accuracy"]
        base["knn_accuracy"] = fp32_acc
        base["int8_knn_drop_vs_fp32_pt"] = 100.0 * (fp32_acc - section["knn"]["accuracy"])
    return base
