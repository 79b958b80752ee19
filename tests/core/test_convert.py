"""Checkpoint conversion: official, chunked, SwiGLU and timm layouts; inference; bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from dinoforge.core.backbone import build_backbone
from dinoforge.core.backbone.convert import dinoforge_to_official, infer_config, to_dinoforge
from dinoforge.core.checkpoint import backbone_from_state_dict, load_backbone, read_state_dict
from dinoforge.core.errors import CheckpointError
from dinoforge.core.parity.backbone import official_state_from_fixture


def _fixture_state(fixtures_dir: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    fx = torch.load(fixtures_dir / name, weights_only=True)
    return fx, official_state_from_fixture(fx)


@pytest.mark.parametrize("name", ["backbone_official_noreg.pt", "backbone_official_reg4.pt"])
def test_official_state_dict_loads_with_inferred_arch(fixtures_dir: Path, name: str) -> None:
    fx, state = _fixture_state(fixtures_dir, name)
    model, fmt = backbone_from_state_dict(state, num_heads=int(fx["config/num_heads"]))
    assert fmt == "official"
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.img_size) == (64, 2, 56)
    assert cfg.num_register_tokens == fx["config/num_register_tokens"]
    assert cfg.interpolate_antialias == fx["config/interpolate_antialias"]
    assert cfg.interpolate_offset == pytest.approx(fx["config/interpolate_offset"])
    with torch.no_grad():
        out = model.forward_dino(fx["res2/input"])
    assert torch.allclose(out["x_norm_patchtokens"], fx["res2/x_norm_patchtokens"], atol=1e-5)


def test_official_roundtrip_names(fixtures_dir: Path) -> None:
    _, state = _fixture_state(fixtures_dir, "backbone_official_reg4.pt")
    ours = to_dinoforge(state, "official")
    assert "reg_token" in ours and "register_tokens" not in ours
    back = dinoforge_to_official(ours)
    assert set(back) == set(state)


def test_chunked_blocks_layout(fixtures_dir: Path) -> None:
    fx, state = _fixture_state(fixtures_dir, "backbone_official_noreg.pt")
    # block_chunks=2 with depth 2: chunk c holds block c under its global index.
    chunked = {(k.replace(f"blocks.{i}.", f"blocks.{i}.{i}.", 1) if k.startswith(f"blocks.{i}.") else k): v
               for k, v in state.items() for i in [int(k.split(".")[1]) if k.startswith("blocks.") else -1]}
    assert any(k.startswith("blocks.1.1.") for k in chunked)
    model, _ = backbone_from_state_dict(chunked, num_heads=2)
    with torch.no_grad():
        out = model.forward_dino(fx["res0/input"])
    assert torch.allclose(out["x_norm_clstoken"], fx["res0/x_norm_clstoken"], atol=1e-5)


def test_swiglu_official_names_roundtrip() -> None:
    torch.manual_seed(0)
    model = build_backbone("test", ffn="swiglu").eval()
    official = dinoforge_to_official(model.state_dict())
    assert "blocks.0.mlp.w12.weight" in official and "blocks.0.mlp.w3.weight" in official
    loaded, fmt = backbone_from_state_dict(official, num_heads=2)
    assert fmt == "official" and loaded.config.ffn == "swiglu"
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), model.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("timm_name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_dinov2_checkpoint_matches_timm_at_training_size(timm_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=98).eval()
    with torch.no_grad():  # give every LayerScale and bias a non-trivial value
        for name, p in ref.named_parameters():
            if name.endswith(("gamma", "bias")) or "token" in name:
                p.normal_(0, 0.1)
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_backbone(path)
    assert loaded.source_format == "timm"
    x = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        assert torch.allclose(loaded.backbone.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_infer_config_overrides_and_contradictions() -> None:
    state = build_backbone("test").state_dict()
    assert infer_config(state).num_heads == 1  # 64 / official head width 64
    assert infer_config(state, num_heads=2).num_heads == 2
    with pytest.raises(CheckpointError, match="contradicts"):
        infer_config(state, patch_size=16)


def test_infer_config_reads_a_conv_stem() -> None:
    torch.manual_seed(0)
    model = build_backbone("test", stem_channels=(8, 16)).eval()
    state = model.state_dict()
    cfg = infer_config(state, num_heads=2)
    assert cfg.stem_channels == (8, 16) and cfg.in_chans == 3 and cfg.patch_size == 14
    rebuilt, _ = backbone_from_state_dict(state, num_heads=2)
    rebuilt.eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), model.forward_features(x))


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(build_backbone("test").state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(truncated)
    pickled = tmp_path / "code.pth"
    torch.save({"obj": Path("/etc")}, pickled)  # a non-tensor object: refused by weights_only
    with pytest.raises(CheckpointError):
        read_state_dict(pickled)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_wrong_shape_state_dict_names_the_tensor() -> None:
    state = build_backbone("test").state_dict()
    state["blocks.1.attn.qkv.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointError, match="blocks.1.attn.qkv.weight"):
        backbone_from_state_dict(state, num_heads=2)
