"""Frozen teachers from every supported source, checked against independent references."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from dinoforge.core.artifact import load_artifact
from dinoforge.core.errors import ArtifactError, CheckpointError, ConfigError
from dinoforge.core.fileio import sha256_file
from dinoforge.distill.config import TeacherConfig
from dinoforge.distill.teacher import load_teacher, require_heads


def test_official_pth_teacher_reproduces_the_golden_tokens(official_pth: Path, fixtures_dir: Path) -> None:
    # the file cannot tell the head count of a width-64 model (official default: width / 64 = 1); it has 2
    teacher, info = load_teacher(TeacherConfig(path=str(official_pth), num_heads=2))
    assert info.kind == "official" and info.sha256 == sha256_file(official_pth) and teacher.head_names == ()
    golden = torch.load(fixtures_dir / "backbone_official_noreg.pt", weights_only=True)
    for res in ("res0", "res3"):  # 56x56 and 42x70: the position embedding is interpolated officially
        out = teacher.features([golden[f"{res}/input"]])[0]
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(out[key], golden[f"{res}/{key}"], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="use mode: feature"):
        require_heads(teacher, info)


def test_timm_checkpoint_teacher_matches_timm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2,
                                                           num_heads=2, init_values=0.5, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "vit_timm.pth")
    teacher, info = load_teacher(TeacherConfig(path=str(tmp_path / "vit_timm.pth"), num_heads=2))
    assert info.kind == "timm"
    x = torch.randn(3, 3, 56, 56)
    out = teacher.features([x])[0]
    with torch.no_grad():
        tokens = ref.forward_features(x)  # [B, 1 + N, D] after the final norm
    torch.testing.assert_close(out["x_norm_clstoken"], tokens[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], tokens[:, 1:], rtol=0, atol=1e-5)


def test_artifact_teacher_is_frozen_and_counts_its_passes(pretrained_teacher: Path) -> None:
    teacher, info = load_teacher(TeacherConfig(path=str(pretrained_teacher)))
    art = load_artifact(pretrained_teacher)
    assert info.kind == "artifact" and info.sha256 == art.card.weights_sha256 and teacher.head_names == ("dino_head",)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    x, small = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14)
    out = teacher.features([x, small])
    assert teacher.forward_passes == 2 and not out[0]["x_norm_clstoken"].requires_grad
    with torch.no_grad():
        ref_cls = art.backbone.forward_dino(x)["x_norm_clstoken"]
        ref_logits = art.heads["dino_head"](ref_cls)
    torch.testing.assert_close(out[0]["x_norm_clstoken"], ref_cls, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.head("dino_head", out[0]["x_norm_clstoken"]), ref_logits, rtol=0, atol=1e-5)
    require_heads(teacher, info)


def test_bf16_teacher_halves_weights_and_stays_close(official_pth: Path) -> None:
    fp32, _ = load_teacher(TeacherConfig(path=str(official_pth), num_heads=2))
    bf16, _ = load_teacher(TeacherConfig(path=str(official_pth), num_heads=2, precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    x = torch.randn(4, 3, 56, 56)
    a, b = fp32.features([x])[0], bf16.features([x])[0]
    assert b["x_norm_patchtokens"].dtype == torch.float32
    cos = F.cosine_similarity(a["x_norm_patchtokens"], b["x_norm_patchtokens"], dim=-1)
    assert cos.min() > 0.98


def test_missing_or_wrong_teacher_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(TeacherConfig(path=str(tmp_path / "nope.pth")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not a model artifact"):
        load_teacher(TeacherConfig(path=str(tmp_path / "folder")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_teacher(TeacherConfig(path=str(tmp_path / "junk.pth")))
    bad = tmp_path / "bad_artifact"
    bad.mkdir()
    (bad / "model.json").write_text("{}")
    with pytest.raises(ArtifactError):
        load_teacher(TeacherConfig(path=str(bad)))
