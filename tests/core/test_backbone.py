"""Backbone behaviour beyond the golden fixtures: timm vocabulary, masks, drop path, architectures."""

from __future__ import annotations

import pytest
import torch

from dinoforge.core.backbone import ARCHITECTURES, build_backbone, drop_path_rates, get_arch
from dinoforge.core.backbone.block import kept_rows, sdpa_backend_for
from dinoforge.core.errors import ConfigError


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("test_reg4").eval()


def test_timm_vocabulary_shapes(model: torch.nn.Module) -> None:
    x = torch.randn(3, 3, 56, 84)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 4 + 4 * 6, 64)
    assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    final, inter = model.forward_intermediates(x, indices=2)
    assert torch.equal(final, tokens)
    assert [t.shape for t in inter] == [(3, 64, 4, 6)] * 2


def test_forward_dino_matches_forward_features(model: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 56, 56)
    out = model.forward_dino(x)
    tokens = model.forward_features(x)
    assert torch.equal(out["x_norm_clstoken"], tokens[:, 0])
    assert torch.equal(out["x_norm_regtokens"], tokens[:, 1:5])
    assert torch.equal(out["x_norm_patchtokens"], tokens[:, 5:])


def test_mask_token_replaces_patches_before_pos_embed(model: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        model.mask_token.normal_()
        tokens = model.prepare_tokens(x, masks)
        plain = model.prepare_tokens(x)
    pos = model.interpolate_pos_encoding((4, 4))[0, 1:]  # [16, D]
    # Masked patch = mask_token + its position embedding; registers sit between CLS and patches.
    assert torch.allclose(tokens[0, 5:10], model.mask_token + pos[:5], atol=1e-6)
    assert torch.equal(tokens[1], plain[1])
    assert torch.equal(tokens[0, 10:], plain[0, 10:])


def test_registers_get_no_position_embedding(model: torch.nn.Module) -> None:
    tokens = model.prepare_tokens(torch.randn(1, 3, 56, 56))
    assert torch.equal(tokens[0, 1:5], model.reg_token[0])


def test_bad_mask_shape_is_a_clear_error(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="masks must be"):
        model.forward_dino(torch.randn(2, 3, 56, 56), masks=torch.zeros(2, 15, dtype=torch.bool))


def test_list_forward_equals_separate_forwards_in_eval(model: torch.nn.Module) -> None:
    g, loc = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    out_g, out_l = model.forward_dino_list([g, loc], [None, None])
    assert torch.allclose(out_g["x_prenorm"], model.forward_dino(g)["x_prenorm"], atol=1e-6)
    assert torch.allclose(out_l["x_prenorm"], model.forward_dino(loc)["x_prenorm"], atol=1e-6)


def test_efficient_drop_path_uses_row_subsets_and_scales() -> None:
    torch.manual_seed(0)
    model = build_backbone("test", drop_path_rate=0.5, drop_path_uniform=True).train()
    calls: list[tuple[int, int]] = []

    def sampler(batch: int, keep: int, device: torch.device) -> torch.Tensor:
        calls.append((batch, keep))
        return torch.arange(keep)

    for blk in model.blocks:
        blk.row_sampler = sampler
    g, loc = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    out_g, out_l = model.forward_dino_list([g, loc], [None, None])
    # Per block: attention draws for both groups, then MLP draws for both groups.
    assert calls == [(4, 2), (6, 3), (4, 2), (6, 3)] * 2
    # Rows outside every subset pass through the blocks untouched (identity residual).
    tokens = model.prepare_tokens(g)
    assert torch.equal(out_g["x_prenorm"][3], tokens[3])
    assert not torch.equal(out_g["x_prenorm"][0], tokens[0])


def test_kept_rows_uses_python_float_rounding() -> None:
    assert kept_rows(6, 0.4) == 3  # int(6 * 0.6) = int(3.5999999999999996)
    assert kept_rows(1, 0.9) == 1


def test_drop_path_rates_linear_and_uniform() -> None:
    cfg = get_arch("vits14", drop_path_rate=0.4)
    rates = drop_path_rates(cfg)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4) and len(rates) == 12
    assert drop_path_rates(get_arch("vits14", drop_path_rate=0.4, drop_path_uniform=True)) == [0.4] * 12


def test_registered_architectures_are_consistent() -> None:
    assert get_arch("vitg14").ffn == "swiglu" and get_arch("vitg14").hidden_dim == 4096
    assert get_arch("vitl14").embed_dim == 1024 and get_arch("vitl14").depth == 24
    for name, cfg in ARCHITECTURES.items():
        assert cfg.embed_dim % cfg.num_heads == 0, name
        if cfg.num_register_tokens:
            assert cfg.interpolate_offset == 0.0 and cfg.interpolate_antialias, name


def test_swiglu_block_parameter_shapes() -> None:
    model = build_backbone("test", ffn="swiglu", mlp_ratio=4.0)
    hidden = (int(64 * 4 * 2 / 3) + 7) // 8 * 8
    assert model.blocks[0].mlp.fc1.weight.shape == (2 * hidden, 64)
    assert model.blocks[0].mlp.fc2.weight.shape == (64, hidden)


def test_unknown_arch_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="unknown architecture"):
        get_arch("vit_huge_nope")
    with pytest.raises(ConfigError, match="divisible"):
        get_arch("test", num_heads=3)


def test_frozen_patch_embed_has_no_grad() -> None:
    model = build_backbone("test", frozen_patch_embed=True)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())


def test_non_multiple_input_size_floors_to_patch_grid(model: torch.nn.Module) -> None:
    assert model.forward_features(torch.randn(1, 3, 60, 71)).shape == (1, 1 + 4 + 4 * 5, 64)


def test_conv_stem_keeps_the_token_grid_and_masks() -> None:
    torch.manual_seed(0)
    model = build_backbone("test", stem_channels=(8, 16)).eval()
    names = {n for n, _ in model.named_parameters() if n.startswith("patch_embed.")}
    assert names == {"patch_embed.stem.0.weight", "patch_embed.stem.1.weight", "patch_embed.stem.1.bias",
                     "patch_embed.stem.3.weight", "patch_embed.stem.4.weight", "patch_embed.stem.4.bias",
                     "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert model.patch_embed.proj.weight.shape == (64, 16, 14, 14)
    x = torch.randn(2, 3, 56, 71)  # 4 x 5 grid; the remainder columns are dropped as with the plain embedding
    out = model.forward_dino(x, masks=torch.zeros(2, 20, dtype=torch.bool))
    assert out["x_norm_patchtokens"].shape == (2, 20, 64)
    masks = torch.zeros(2, 20, dtype=torch.bool)
    masks[:, 3] = True
    tokens = model.prepare_tokens(x, masks)
    pos = model.interpolate_pos_encoding((4, 5))
    torch.testing.assert_close(tokens[:, 1 + 3], (model.mask_token + pos[0, 1 + 3]).expand(2, -1))


def test_conv_stem_is_a_real_convolution_before_the_projection() -> None:
    # The stem must see neighbouring pixels across patch borders: changing one pixel just outside a patch
    # changes that patch's token (a plain stride-p projection would not).
    torch.manual_seed(0)
    plain, stem = build_backbone("test").eval(), build_backbone("test", stem_channels=(8,)).eval()
    x = torch.randn(1, 3, 56, 56)
    y = x.clone()
    y[..., 0, 14] += 5.0  # first column of patch (0, 1): its 3x3 neighbourhood reaches into patch (0, 0)
    for model, changes in ((plain, False), (stem, True)):
        a, b = model.patch_embed(x)[0, 0, 0], model.patch_embed(y)[0, 0, 0]
        assert (not torch.allclose(a, b)) is changes


def test_conv_stem_rejects_bad_widths() -> None:
    with pytest.raises(ConfigError, match="stem_channels"):
        get_arch("test", stem_channels=(8, 0))


def test_strided_conv_stem_keeps_the_token_grid() -> None:
    """Stride-2 stem layers shrink the map; the projection covers the rest of the patch: same tokens out."""
    torch.manual_seed(0)
    model = build_backbone("test", patch_size=16, img_size=64, stem_channels=(8, 16), stem_strides=(2, 2)).eval()
    assert model.patch_embed.stem[0].stride == (2, 2) and model.patch_embed.stem[3].stride == (2, 2)
    assert model.patch_embed.proj.weight.shape == (64, 16, 4, 4)  # 16 px patch = 4 px of the 1/4 map
    out = model.forward_dino(torch.randn(2, 3, 64, 80))
    assert out["x_norm_patchtokens"].shape == (2, 4 * 5, 64)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., 40:, 40:] += 3.0  # only the bottom-right patches' pixels (and their stem neighbourhood) change
    a, b = model.patch_embed(x)[0], model.patch_embed(y)[0]  # [4, 4, D]
    torch.testing.assert_close(a[0, 0], b[0, 0])
    assert not torch.allclose(a[3, 3], b[3, 3])


@pytest.mark.parametrize("strides", [(2,), (2, 3), (2, 2, 2, 2, 2)])
def test_conv_stem_rejects_bad_strides(strides: tuple[int, ...]) -> None:
    channels = (8,) * max(len(strides), 2) if len(strides) != 1 else (8, 8)
    with pytest.raises(ConfigError, match="stem_strides"):
        get_arch("test", patch_size=16, img_size=64, stem_channels=channels, stem_strides=strides)


def _active_sdpa_backends(x: torch.Tensor) -> set[str]:
    with sdpa_backend_for(x):
        return {name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                      ("math", torch.backends.cuda.math_sdp_enabled())) if on}


def test_low_precision_cpu_attention_uses_the_math_kernel() -> None:
    x32 = torch.randn(2, 5, 64)
    assert _active_sdpa_backends(x32) == {"flash", "math"}  # fp32: PyTorch chooses
    assert _active_sdpa_backends(x32.bfloat16()) == {"math"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _active_sdpa_backends(x32) == {"math"}
    assert _active_sdpa_backends(x32) == {"flash", "math"}  # the context restores the flags


def test_bf16_autocast_block_matches_fp32_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = build_backbone("test").train()
    x = torch.randn(4, 3, 56, 56)
    out32 = model.forward_dino(x)["x_norm_clstoken"]
    out32.square().sum().backward()
    grad32 = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model.forward_dino(x)["x_norm_clstoken"]
    out16.float().square().sum().backward()
    grad16 = model.blocks[0].attn.qkv.weight.grad
    assert torch.allclose(out16.float(), out32, atol=0.1, rtol=0.05)
    cos = torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cos > 0.99


def test_mobilenet_stem_makes_a_hybrid_vit_on_the_same_token_grid() -> None:
    """The first 7 MobileNetV2 blocks (stride 8) feed a 2x2 projection: a 16 px patch grid, frozen norms."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = build_backbone("test", patch_size=16, img_size=64, mobilenet_stem_blocks=7).eval()
    assert model.patch_embed.proj.weight.shape == (64, 32, 2, 2)  # 32 channels at stride 8
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.patch_embed.stem.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    out = model.forward_dino(torch.randn(2, 3, 64, 96))
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, 64)
    # Batch-independent in training mode too (frozen statistics): one image alone equals it inside a batch.
    model.train()
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(model.patch_embed(x)[:1], model.patch_embed(x[:1]))


def test_folding_the_stems_frozen_norms_keeps_its_output() -> None:
    """Every FrozenBatchNorm2d of a MobileNetV2 stem folds into the convolution before it (export graphs)."""
    import copy

    from torchvision.ops.misc import FrozenBatchNorm2d

    from dinoforge.core.backbone.cnn_stem import fold_frozen_batch_norms

    torch.manual_seed(0)
    stem = build_backbone("test", patch_size=16, img_size=64, mobilenet_stem_blocks=7).patch_embed.stem
    norms = [m for m in stem.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():  # non-trivial statistics, as a trained network has
        for norm in norms:
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    folded = copy.deepcopy(stem)
    assert fold_frozen_batch_norms(folded) == len(norms) > 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), stem(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields", [{"mobilenet_stem_blocks": 15},  # stride 32 does not divide patch 16
                                    {"mobilenet_stem_blocks": 7, "stem_channels": (8,)},
                                    {"mobilenet_stem_blocks": 7, "in_chans": 1}])
def test_mobilenet_stem_rejects_bad_geometry(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="mobilenet_stem_blocks"):
        get_arch("test", patch_size=16, img_size=64, **fields)
