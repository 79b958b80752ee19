"""Schedules: exact official values (golden fixture, 1e-12) and the quirks the README lists."""

from __future__ import annotations

import math

import pytest
import torch

from dinoforge.core.config import load_config
from dinoforge.core.errors import ConfigError
from dinoforge.pretrain.schedules import CosineScheduler, ScheduleConfig, build_schedules, scaled_lr


def test_training_script_schedules_match_the_official_values(fixtures_dir) -> None:
    fx = torch.load(fixtures_dir / "schedules.pt", weights_only=True)
    c = {k.removeprefix("config/"): v for k, v in fx.items() if k.startswith("config/")}
    config = ScheduleConfig(epochs=c["epochs"], epoch_length=c["OFFICIAL_EPOCH_LENGTH"],
                            warmup_epochs=c["warmup_epochs"], base_lr=c["base_lr"], min_lr=c["min_lr"],
                            weight_decay=c["weight_decay"], weight_decay_end=c["weight_decay_end"],
                            momentum_teacher=c["momentum_teacher"], final_momentum_teacher=c["final_momentum_teacher"],
                            warmup_teacher_temp=c["warmup_teacher_temp"], teacher_temp=c["teacher_temp"],
                            warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
                            freeze_last_layer_epochs=c["freeze_last_layer_epochs"])
    schedules = build_schedules(config, global_batch_size=c["batch_size_per_gpu"] * c["world_size"])
    for it in range(int(fx["num_evaluated"])):
        for name, value in schedules.at(it).items():
            assert abs(value - fx[name][it].item()) <= 1e-12, (name, it)


def test_warmup_includes_its_endpoint_and_past_the_end_is_final() -> None:
    s = CosineScheduler(base_value=1.0, final_value=0.1, total_iters=10, warmup_iters=4, start_warmup_value=0.0)
    assert [s[i] for i in range(4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert s[4] == 1.0  # the cosine part starts at base: the peak appears twice
    assert s[9] > 0.1 and s[10] == 0.1 and s[10_000] == 0.1
    assert len(s) == 10


def test_freeze_iters_prepend_zeros() -> None:
    s = CosineScheduler(base_value=2.0, final_value=0.0, total_iters=6, freeze_iters=2)
    assert [s[i] for i in range(6)] == pytest.approx([0, 0, 2.0, 1.0 + math.cos(math.pi / 4), 1.0,
                                                      1.0 - math.cos(math.pi / 4)])


def test_teacher_temperature_rises_then_holds_and_last_layer_is_frozen() -> None:
    config = ScheduleConfig(epochs=4, epoch_length=5, warmup_epochs=1, warmup_teacher_temp_epochs=2,
                            freeze_last_layer_epochs=1)
    s = build_schedules(config, global_batch_size=1024)
    temps = [s.teacher_temp[i] for i in range(20)]
    assert temps[0] == pytest.approx(0.04) and temps[9] == pytest.approx(0.07) and temps[10:] == [0.07] * 10
    assert [s.last_layer_lr[i] for i in range(5)] == [0.0] * 5
    assert s.last_layer_lr[5] == s.lr[5] > 0
    assert s.lr[4] == pytest.approx(0.004)  # batch 1024: no scaling


def test_lr_scaling_rules_and_bad_lengths() -> None:
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, "none") == 0.004
    with pytest.raises(ConfigError):
        scaled_lr(0.004, 256, "linear")
    with pytest.raises(ConfigError):
        CosineScheduler(base_value=1.0, final_value=0.0, total_iters=3, warmup_iters=4)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ScheduleConfig, overrides=["epoch=3"])
