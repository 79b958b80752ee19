"""Typed configs: YAML + overrides, unknown keys named, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from dinoforge.core.backbone import BackboneConfig
from dinoforge.core.config import StrictModel, apply_overrides, load_config, save_config
from dinoforge.core.errors import ConfigError


class Optim(StrictModel):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


class Recipe(StrictModel):
    name: str = "x"
    epochs: int = Field(10, gt=0)
    optim: Optim = Optim()
    backbone: BackboneConfig = BackboneConfig()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: tiny\noptim:\n  lr: 0.5\nbackbone:\n  embed_dim: 64\n  num_heads: 2\n")
    cfg = load_config(Recipe, path, ["optim.lr=2e-4", "epochs=3", "optim.betas=[0.8, 0.9]"])
    assert (cfg.name, cfg.epochs, cfg.optim.lr, cfg.optim.betas) == ("tiny", 3, 2e-4, (0.8, 0.9))
    assert cfg.backbone.embed_dim == 64


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(Recipe, path)
    with pytest.raises(ConfigError, match="unknown key 'backbone.widht'"):
        load_config(Recipe, None, ["backbone.widht=3"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config(Recipe, None, ["epochs=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Recipe, None, ["epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"epochs": 3}, ["epochs.x=1"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Recipe, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Recipe, bad)


def test_resolved_config_roundtrips(tmp_path: Path) -> None:
    cfg = load_config(Recipe, None, ["optim.lr=0.25"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Recipe, path) == cfg
