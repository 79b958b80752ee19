"""Parameter groups: the official multipliers (golden fixture, exact) and their robustness to wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinoforge.core.backbone import BackboneConfig
from dinoforge.pretrain.meta_arch import HeadShape, MetaArchConfig, build_student
from dinoforge.pretrain.optim import OptimConfig, apply_schedule, build_optimizer
from dinoforge.pretrain.param_groups import clean_name, layer_id, param_groups
from dinoforge.pretrain.parity.fixture_models import official_name_map

_BACKBONE = BackboneConfig(embed_dim=32, depth=3, num_heads=2, patch_size=14, img_size=56, num_register_tokens=4)


def _student(**kw) -> nn.ModuleDict:
    return build_student(MetaArchConfig(backbone=_BACKBONE.model_copy(update=kw), ibot_separate_head=True,
                                        dino_head=HeadShape(out_dim=16, hidden_dim=8, bottleneck_dim=4),
                                        ibot_head=HeadShape(out_dim=12, hidden_dim=8, bottleneck_dim=4)))


def _per_param(groups: list[dict]) -> dict[str, tuple[float, float, bool, int]]:
    return {name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], i)
            for i, g in enumerate(groups) for name in g["names"]}


def test_official_multipliers_and_group_indices(fixtures_dir) -> None:
    fx = torch.load(fixtures_dir / "param_groups.pt", weights_only=True)
    student = build_student(MetaArchConfig(
        backbone=BackboneConfig(embed_dim=fx["config/embed_dim"], depth=fx["config/depth"],
                                num_heads=fx["config/num_heads"], img_size=fx["config/global_crops_size"],
                                num_register_tokens=fx["config/num_register_tokens"]),
        dino_head=HeadShape(out_dim=fx["config/dino_K"], hidden_dim=fx["config/head_hidden_dim"],
                            bottleneck_dim=fx["config/head_bottleneck_dim"]),
        ibot_head=HeadShape(out_dim=fx["config/ibot_K"], hidden_dim=fx["config/head_hidden_dim"],
                            bottleneck_dim=fx["config/head_bottleneck_dim"]),
        ibot_separate_head=True))
    groups = param_groups(student, layerwise_decay=fx["config/layerwise_decay"],
                          patch_embed_lr_mult=fx["config/patch_embed_lr_mult"])
    official = official_name_map(student)
    ours = {official[n]: v for n, v in _per_param(groups).items()}
    assert len(groups) == fx["num_optimizer_groups"]
    for i, name in enumerate(fx["param_names"]):
        lr, wd, last, index = ours[name]
        assert abs(lr - fx["lr_multiplier"][i].item()) <= 1e-12, name
        assert wd == fx["wd_multiplier"][i].item() and last == bool(fx["is_last_layer"][i]), name
        assert index == fx["optimizer_group_index"][i].item(), name


def test_layer_ids_follow_the_official_rule() -> None:
    assert [layer_id(n, 12) for n in ("cls_token", "reg_token", "pos_embed", "mask_token", "patch_embed.proj.bias",
                                      "blocks.0.attn.qkv.weight", "blocks.11.ls2.gamma", "norm.weight")] == \
        [0, 0, 0, 0, 0, 1, 12, 13]


def test_wrapped_and_compiled_names_give_the_same_groups() -> None:
    student = _student()
    plain = _per_param(param_groups(student))
    compiled = nn.ModuleDict({k: torch.compile(v) for k, v in student.items()})  # lazy: nothing compiles here
    assert next(iter(compiled["backbone"].state_dict())).startswith("_orig_mod.")
    assert _per_param(param_groups(compiled)) == plain
    assert clean_name("module._fsdp_wrapped_module.blocks.3._checkpoint_wrapped_module.mlp.fc1.weight") == \
        "blocks.3.mlp.fc1.weight"


def test_frozen_parameters_are_left_out() -> None:
    frozen = _student(frozen_patch_embed=True)
    names = {n for g in param_groups(frozen) for n in g["names"]}
    assert "backbone.patch_embed.proj.weight" not in names and "backbone.cls_token" in names


def test_apply_schedule_sets_effective_values() -> None:
    student = _student()
    optimizer = build_optimizer(student, OptimConfig(layerwise_decay=0.5, patch_embed_lr_mult=0.2))
    apply_schedule(optimizer, {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 0.0})
    by_name = {n: g for g in optimizer.param_groups for n in g["names"]}
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5 ** 4 * 0.2)
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["backbone.norm.weight"]["lr"] == pytest.approx(1e-3) and by_name["backbone.norm.weight"][
        "weight_decay"] == 0.0
    assert by_name["dino_head.last_layer.weight_g"]["lr"] == 0.0  # frozen last layer
    assert by_name["dino_head.last_layer.weight_g"]["weight_decay"] == pytest.approx(0.04)  # decayed (official)
    assert by_name["backbone.blocks.0.ls1.gamma"]["weight_decay"] == 0.0
    assert by_name["backbone.reg_token"]["weight_decay"] == pytest.approx(0.04)
