"""Bundled recipes: they load, carry the documented header, and hold the official hyper-parameters."""

from __future__ import annotations

import pytest
import torch
import yaml

from dinoforge.core.config import config_to_yaml
from dinoforge.pretrain.config import PretrainConfig, bundled_recipes, load_pretrain_config, resolve_recipe
from dinoforge.pretrain.meta_arch import SSLMetaArch

#: Official DINOv2 values (ssl_default_config.yaml and the vitl14 / vitg14 train configs).
OFFICIAL_DEFAULT = {
    "schedule.base_lr": 0.004, "schedule.min_lr": 1e-6, "schedule.warmup_epochs": 10, "schedule.epoch_length": 1250,
    "schedule.weight_decay": 0.04, "schedule.weight_decay_end": 0.4, "schedule.momentum_teacher": 0.992,
    "schedule.final_momentum_teacher": 1.0, "schedule.warmup_teacher_temp": 0.04, "schedule.teacher_temp": 0.07,
    "schedule.warmup_teacher_temp_epochs": 30, "schedule.freeze_last_layer_epochs": 1, "schedule.epochs": 100,
    "optim.clip_grad": 3.0, "optim.layerwise_decay": 0.9, "optim.patch_embed_lr_mult": 0.2,
    "crops.global_crops_size": 224, "crops.local_crops_number": 8, "crops.global_crops_scale": (0.32, 1.0),
    "crops.local_crops_scale": (0.05, 0.32), "model.dino_head.out_dim": 65536, "model.dino_head.hidden_dim": 2048,
    "model.dino_head.bottleneck_dim": 256, "model.koleo_loss_weight": 0.1, "model.centering": "centering",
    "model.ibot_separate_head": False, "model.backbone.layerscale_init": 1e-5, "masking.mask_ratio_min_max": (0.1, 0.5),
    "masking.mask_sample_probability": 0.5, "data.batch_size": 64,
}
OFFICIAL_LARGE = {
    **{k: v for k, v in OFFICIAL_DEFAULT.items() if k not in ("data.batch_size",)},
    "schedule.base_lr": 2e-4, "schedule.warmup_epochs": 80, "schedule.epochs": 500, "schedule.weight_decay_end": 0.2,
    "schedule.momentum_teacher": 0.994, "optim.layerwise_decay": 1.0, "model.dino_head.out_dim": 131072,
    "model.dino_head.bottleneck_dim": 384, "model.ibot_head.out_dim": 131072, "model.ibot_separate_head": True,
    "model.centering": "sinkhorn_knopp", "model.backbone.drop_path_rate": 0.4, "crops.local_crops_size": 98,
}
EXPECTED = {
    "vits14": ({**OFFICIAL_DEFAULT, "model.backbone.embed_dim": 384, "model.backbone.patch_size": 14}, 21.6e6),
    "vitb14": ({**OFFICIAL_DEFAULT, "model.backbone.embed_dim": 768, "model.backbone.patch_size": 14}, 85.7e6),
    "vitl14": ({**OFFICIAL_LARGE, "model.backbone.embed_dim": 1024, "model.backbone.depth": 24,
                "data.batch_size": 32}, 303.2e6),
    "vitg14": ({**OFFICIAL_LARGE, "model.backbone.embed_dim": 1536, "model.backbone.depth": 40,
                "model.backbone.ffn": "swiglu", "data.batch_size": 12}, 1134.8e6),
}


def _get(cfg: PretrainConfig, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_all_recipes_are_bundled() -> None:
    assert set(bundled_recipes()) >= {"tiny", "fmnist", "vits14", "vitb14", "vitl14", "vitg14"}


@pytest.mark.parametrize("name", ["tiny", "fmnist", "mnv2_photos_ssl", "vits14", "vitb14", "vitl14", "vitg14"])
def test_recipe_loads_and_has_a_header(name: str) -> None:
    path = resolve_recipe(name)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    for field in ("Command:", "Hardware:", "Time:", "Metric:"):
        assert field in text, f"{name}: header lacks {field}"
    assert f"--config {name}" in text
    cfg = load_pretrain_config(name)
    # the resolved config round-trips through YAML (what a run directory stores)
    again = PretrainConfig.model_validate(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_hyper_parameters(name: str) -> None:
    expected, n_params = EXPECTED[name]
    cfg = load_pretrain_config(name)
    for dotted, value in expected.items():
        got = _get(cfg, dotted)
        assert got == pytest.approx(value) if isinstance(value, (float, tuple)) else got == value, (dotted, got)
    with torch.device("meta"):  # shapes only: the ViT-g/14 student + teacher would need ~10 GB
        meta = SSLMetaArch(cfg.model)
    backbone = sum(p.numel() for p in meta.student["backbone"].parameters())
    assert backbone == pytest.approx(n_params, rel=0.002)


def test_fmnist_recipe_targets_the_acceptance_setup() -> None:
    cfg = load_pretrain_config("fmnist")
    assert cfg.data.source == "fmnist:train"
    assert cfg.knn.train == "fmnist:train" and cfg.knn.test == "fmnist:test" and cfg.knn.at_end
    assert cfg.train.device == "cpu" and cfg.crops.global_crops_size == 28
