"""Feature extraction: poolings against the backbone's own outputs, loaders with bad files, model loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoforge.core.artifact import load_artifact
from dinoforge.core.backbone import build_backbone
from dinoforge.core.backbone.convert import dinoforge_to_official
from dinoforge.core.data import ImageFolderSource, open_source
from dinoforge.core.errors import ArtifactError, CheckpointError, ConfigError, DataError
from dinoforge.core.eval import (PIXEL_CONTRACT, BackboneExtractor, PixelExtractor, extract_features,
                                 load_eval_model)
from dinoforge.core.preprocess import PreprocessConfig, preprocess_image
from tests.core.helpers import make_labelled_folder, write_corrupt_jpeg


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def test_poolings_match_backbone_outputs(tiny_reg_artifact: Path) -> None:
    backbone = load_artifact(tiny_reg_artifact).backbone
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    feats = BackboneExtractor(backbone, ("cls", "mean", "cls+mean"))(x)
    with torch.no_grad():
        tokens = backbone.forward_features(x)  # [B, 1 + 4 + 16, D]: cls, registers, patches
    torch.testing.assert_close(feats["cls"], tokens[:, 0])
    torch.testing.assert_close(feats["mean"], tokens[:, 5:].mean(1))  # registers are not averaged
    torch.testing.assert_close(feats["cls+mean"], torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1))
    assert feats["cls+mean"].shape == (3, 128) and feats["cls"].dtype == torch.float32


def test_autocast_bf16_close_to_fp32(tiny_artifact: Path) -> None:
    backbone = load_artifact(tiny_artifact).backbone
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    full = BackboneExtractor(backbone, ("cls",))(x)["cls"]
    half = BackboneExtractor(backbone, ("cls",), autocast="bf16")(x)["cls"]
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.99


def test_extract_features_skips_bad_files(tiny_artifact: Path, sample_images_dir: Path, tmp_path: Path) -> None:
    make_labelled_folder(sample_images_dir, tmp_path, per_class=2)
    write_corrupt_jpeg(tmp_path / "imagenet" / "zz_broken.jpg", sample_images_dir)
    src = ImageFolderSource(tmp_path)
    model = load_eval_model(tiny_artifact, poolings=("cls", "mean"))
    feats = extract_features(model.extractor, src, preprocess=model.preprocess, batch_size=4, num_workers=2,
                             progress=False)
    assert len(feats) == 6 and feats.stats.bad == 1 and feats.stats.bad_samples[0].id == "imagenet/zz_broken.jpg"
    assert feats.ids == [i for i in src.ids if i != "imagenet/zz_broken.jpg"]
    assert feats.labels.tolist() == [0, 0, 1, 1, 2, 2] and feats.names == ["cls", "mean"]
    one = src[src.ids.index(feats.ids[3])]
    single = model.extractor(preprocess_image(one.image, model.preprocess)[None])
    torch.testing.assert_close(feats["mean"][3], single["mean"][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="preprocess contract"):
        extract_features(model.extractor, src)
    for f in tmp_path.rglob("*.*"):
        f.write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable samples"):
        extract_features(model.extractor, ImageFolderSource(tmp_path), preprocess=model.preprocess, progress=False)


def test_pixel_model_gives_unit_range_pixels() -> None:
    model = load_eval_model("pixels")
    assert model.kind == "pixels" and model.preprocess == PIXEL_CONTRACT
    src = open_source("fmnist:test[:8]")
    feats = extract_features(model.extractor, src, preprocess=model.preprocess, progress=False)
    expected = torch.from_numpy(src.parent.images[:8].astype(np.float32) / 255.0)  # grey: three equal channels
    torch.testing.assert_close(feats["pixels"], expected.reshape(8, 1, 784).expand(8, 3, 784).reshape(8, -1))
    assert isinstance(model.extractor, PixelExtractor)
    bigger = load_eval_model("pixels", preprocess_overrides=["size=14"])
    assert bigger.preprocess.size == 14


def test_load_eval_model_sources(tiny_artifact: Path, tmp_path: Path) -> None:
    art = load_eval_model(tiny_artifact, poolings=("cls+mean",))
    assert art.kind == "artifact" and art.preprocess.size == 56 and art.sha256
    assert art.describe()["architecture"]["embed_dim"] == 64
    # An official-format checkpoint (head width 64, the official default the loader assumes).
    torch.manual_seed(3)
    backbone = build_backbone("test", num_heads=1).eval()
    pth = tmp_path / "official.pth"
    torch.save(dinoforge_to_official(backbone.state_dict()), pth)
    ckpt = load_eval_model(pth, preprocess_overrides=["size=56", "resize_size=64"])
    assert ckpt.kind == "checkpoint" and ckpt.preprocess.mode == "center_crop" and ckpt.preprocess.size == 56
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ckpt.extractor(x)["cls"], BackboneExtractor(backbone)(x)["cls"])
    assert load_eval_model(pth).preprocess == PreprocessConfig(patch_size=14)  # DINOv2 eval contract


def test_load_eval_model_errors(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_eval_model(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="not a model artifact"):
        load_eval_model(tmp_path / "dir")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError):
        load_eval_model(tmp_path / "trunc.pth")
    broken = tmp_path / "broken_art"
    shutil.copytree(tiny_artifact, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_eval_model(broken)
    with pytest.raises(ConfigError, match="unknown pooling"):
        load_eval_model(tiny_artifact, poolings=("gem",))
    with pytest.raises(ConfigError, match="sizee"):
        load_eval_model(tiny_artifact, preprocess_overrides=["sizee=3"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_eval_model(tiny_artifact, device="cuda")
