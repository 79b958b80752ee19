"""Shared exports for the export tests (built once per session; tiny models keep them fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoforge.export.pipeline import OnnxExportOptions, export_onnx

# Small parity sets keep every export of a tiny model to a few seconds.
FAST = {"parity_limit": 20, "knn_limit": 100}


@pytest.fixture(scope="session")
def tiny_export(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory, sample_images_dir: Path) -> Path:
    """fp32 export of the tiny model at its native 56 px and at 84 px (dynamo exporter)."""
    out = tmp_path_factory.mktemp("exports") / "tiny_fp32"
    export_onnx(tiny_artifact, out, OnnxExportOptions(resolutions="56,84", exporter="dynamo",
                                                      parity_images=sample_images_dir, **FAST))
    return out


@pytest.fixture(scope="session")
def tiny_reg_raw_export(tiny_reg_artifact: Path, tmp_path_factory: pytest.TempPathFactory,
                        sample_images_dir: Path) -> Path:
    """fp32 export of the register model at 84 px with embedded preprocessing and patch tokens."""
    out = tmp_path_factory.mktemp("exports") / "tiny_reg_raw"
    export_onnx(tiny_reg_artifact, out, OnnxExportOptions(resolutions="84", embed_preprocessing=True,
                                                          patch_tokens=True, parity_images=sample_images_dir,
                                                          **FAST))
    return out
