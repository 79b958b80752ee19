"""Model artifacts: round trip, validation errors, atomicity, heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinoforge.core.artifact import Provenance, load_artifact, read_card, save_artifact
from dinoforge.core.backbone import build_backbone
from dinoforge.core.backbone.heads import DINOHead, HeadConfig
from dinoforge.core.errors import ArtifactError
from dinoforge.core.preprocess import PreprocessConfig


def _save(path: Path, **kw: object) -> Path:
    torch.manual_seed(0)
    return save_artifact(path, build_backbone("test_reg4"), name="t", provenance=Provenance(source="random-init"),
                         **kw)


def test_roundtrip_preserves_outputs_and_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("test_reg4").eval()
    head = DINOHead(HeadConfig(in_dim=64, out_dim=32, hidden_dim=48, bottleneck_dim=16))
    pre = PreprocessConfig(mode="resize", size=28, patch_size=14)
    prov = Provenance(source="pretrain", parent_sha256="ab" * 32, recipe="tiny", metrics={"knn_top1": 0.5})
    save_artifact(tmp_path / "a", model, name="tiny", provenance=prov, preprocessing=pre, heads={"dino_head": head})
    art = load_artifact(tmp_path / "a")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(art.backbone.forward_features(x), model.forward_features(x))
        z = torch.randn(5, 64)
        assert torch.equal(art.heads["dino_head"](z), head(z))
    card = art.card
    assert card.preprocessing == pre and card.provenance.metrics == {"knn_top1": 0.5}
    assert card.embedding_dims == {"cls": 64, "mean": 64, "cls+mean": 128}
    assert card.num_parameters == sum(p.numel() for p in model.parameters())


def test_missing_files_are_named(tmp_path: Path) -> None:
    path = _save(tmp_path / "a")
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_card(tmp_path / "nowhere")
    (path / "model.json").unlink()
    with pytest.raises(ArtifactError, match="no model.json"):
        read_card(path)


def test_replaced_weights_fail_the_hash_check(tmp_path: Path) -> None:
    a, b = _save(tmp_path / "a"), _save(tmp_path / "b", preprocessing=PreprocessConfig(size=28, resize_size=32))
    torch.manual_seed(5)
    save_artifact(tmp_path / "c", build_backbone("test_reg4"), name="c", provenance=Provenance(source="x"))
    (a / "model.safetensors").write_bytes((tmp_path / "c" / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="does not match the weights_sha256"):
        load_artifact(a)
    assert load_artifact(b).card.preprocessing.size == 28


def test_card_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    path = _save(tmp_path / "a")
    card = json.loads((path / "model.json").read_text())
    card["architecture"]["depth"] = 3
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(path)
    card["architecture"]["depth"] = 2
    card["architecture"]["bogus"] = 1
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="unknown key 'architecture.bogus'"):
        load_artifact(path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "a")
    card = json.loads((path / "model.json").read_text())
    card["format_version"] = 99
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="format_version 99"):
        read_card(path)


def test_existing_directory_is_not_overwritten_and_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = _save(tmp_path / "a")
    before = (path / "model.json").read_text()
    with pytest.raises(ArtifactError, match="already exists"):
        _save(tmp_path / "a")
    assert (path / "model.json").read_text() == before

    class Exploding(torch.nn.Module):
        config = build_backbone("test").config

        def state_dict(self, *a: object, **k: object) -> dict:
            return {"x": torch.zeros(1)}

        def parameters(self, recurse: bool = True):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        # Exploding stands in for a backbone: only what save_artifact reads before the write fails
        save_artifact(tmp_path / "b", Exploding(), name="b", provenance=Provenance(source="x"))  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_conv_stem_backbone_roundtrips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("test", stem_channels=(8,)).eval()
    save_artifact(tmp_path / "a", model, name="stem", provenance=Provenance(source="random-init"))
    art = load_artifact(tmp_path / "a")
    assert art.card.architecture.stem_channels == (8,)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(art.backbone.forward_features(x), model.forward_features(x))
