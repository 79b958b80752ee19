"""Distillation runs end to end on real Fashion-MNIST images: outputs, provenance, shared teacher passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from dinoforge.core.artifact import load_artifact, save_artifact
from dinoforge.core.backbone.heads import DINOHead, HeadConfig
from dinoforge.core.cli import main as cli_main
from dinoforge.core.fileio import sha256_file
from dinoforge.distill.config import DistillConfig, load_distill_config
from dinoforge.distill.trainer import distill_trainer
from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint
from dinoforge.pretrain.monitor import read_metrics
from dinoforge.pretrain.trainer import Trainer

from tests.distill.conftest import FAST

SMALL = "{embed_dim: 16, depth: 2, num_heads: 2, patch_size: 7, img_size: 28, layerscale_init: 0.1}"
WIDE = "{embed_dim: 24, depth: 2, num_heads: 2, patch_size: 7, img_size: 28, layerscale_init: 0.1}"


def _train(run_dir: Path, teacher: Path, *overrides: str) -> tuple[Trainer, object]:
    cfg = load_distill_config("tiny", [f"run_dir={run_dir}", f"teacher.path={teacher}", *FAST, *overrides])
    trainer = distill_trainer(cfg)
    return trainer, trainer.run()


def test_head_mode_run_writes_a_student_artifact_naming_its_teacher(tmp_path: Path, pretrained_teacher: Path,
                                                                    capsys) -> None:
    run = tmp_path / "run"
    status = cli_main(["distill", "--config", "tiny", f"run_dir={run}", f"teacher.path={pretrained_teacher}", *FAST,
                       "train.max_steps=6", "checkpoint.every_steps=3", "knn.at_end=true",
                       "knn.train=fmnist:train[:200]", "knn.test=fmnist:test[:100]", "knn.k=10"])
    assert status == 0
    out = capsys.readouterr().out
    assert "finished at step 6" in out and "small: k-NN top-1" in out and "teacher" in out
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert DistillConfig.model_validate(resolved).teacher.path == str(pretrained_teacher)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 6]
    train = [r for r in read_metrics(run) if "total_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for rec in train:
        for key in ("small/dino_local_crops_loss", "small/dino_global_crops_loss", "small/ibot_loss",
                    "small/koleo_loss", "grad_norm_small_backbone", "grad_norm_small_dino_head",
                    "small/feature_std", "teacher_entropy"):
            assert math.isfinite(rec[key]), key
        assert rec["teacher_forwards"] == rec["step"]  # one teacher pass (2 global crops) per step
    knn = [r for r in read_metrics(run) if "small/knn_top1" in r][-1]
    assert 0 < knn["teacher/knn_top1"] <= 100 and knn["small/knn_ratio"] == pytest.approx(
        knn["small/knn_top1"] / knn["teacher/knn_top1"])

    teacher = load_artifact(pretrained_teacher)
    art = load_artifact(run / "artifacts" / "small")
    prov = art.card.provenance
    assert prov.source == "distill" and prov.parent_sha256 == teacher.card.weights_sha256
    assert prov.parent == str(pretrained_teacher) and prov.details["mode"] == "head"
    assert prov.metrics["knn_top1"] == knn["small/knn_top1"] and prov.data_manifest_sha256
    assert art.card.architecture.embed_dim == 16 and art.card.heads["dino_head"].out_dim == 64  # the teacher's K
    assert art.card.heads["dino_head"].in_dim == 16
    final = load_checkpoint(checkpoint_path(run / "checkpoints", 6))
    for name, value in art.backbone.state_dict().items():  # the artifact is the student EMA
        assert torch.equal(value, final["teacher"][f"small_backbone.{name}"]), name
    assert not torch.equal(final["teacher"]["small_backbone.cls_token"], final["student"]["small_backbone.cls_token"])


def _hook_counter(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def test_two_students_share_the_teacher_and_match_separate_runs(tmp_path: Path, pretrained_teacher: Path) -> None:
    both = f"students=[{{name: a, seed: 1, backbone: {SMALL}}}, {{name: b, seed: 2, backbone: {WIDE}}}]"
    runs = {"both": both, "a": f"students=[{{name: a, seed: 1, backbone: {SMALL}}}]",
            "b": f"students=[{{name: b, seed: 2, backbone: {WIDE}}}]"}
    rows, finals = {}, {}
    for key, students in runs.items():
        cfg = load_distill_config("tiny", [f"run_dir={tmp_path / key}", f"teacher.path={pretrained_teacher}", *FAST,
                                           students, "train.max_steps=5", "checkpoint.every_steps=5",
                                           "spike.policy='off'"])
        trainer = distill_trainer(cfg)
        rows[key] = _hook_counter(trainer.parts.model.frozen.backbone.patch_embed)  # independent of our own counter
        trainer.run()
        finals[key] = load_checkpoint(checkpoint_path(tmp_path / key / "checkpoints", 5))
    # the teacher ran once per step (on 2 x 8 global crops) whether one or two students learn from it
    assert rows["both"] == rows["a"] == rows["b"] == [16] * 5
    for name in ("a", "b"):
        for tree in ("student", "teacher"):
            alone = finals[name][tree]
            shared = {k: v for k, v in finals["both"][tree].items() if k.startswith(f"{name}_")}
            assert shared.keys() == alone.keys()
            for k in alone:
                torch.testing.assert_close(shared[k], alone[k], rtol=0, atol=0, msg=f"{tree}.{k}")
    losses = [r for r in read_metrics(tmp_path / "both") if "total_loss" in r][-1]
    alone = [r for r in read_metrics(tmp_path / "a") if "total_loss" in r][-1]
    assert losses["a/total"] == alone["a/total"]


def test_feature_mode_from_an_official_pth_learns(tmp_path: Path, official_pth: Path) -> None:
    students = ("students=[{name: p7, seed: 3, backbone: {embed_dim: 32, depth: 2, num_heads: 2, patch_size: 7, "
                "img_size: 56, layerscale_init: 0.1}}, {name: same, seed: 4, arch: test}]")
    trainer, result = _train(tmp_path / "f", official_pth, "mode=feature", "teacher.num_heads=2", students,
                             "crops.global_crops_size=56", "crops.local_crops_size=28", "train.max_steps=12",
                             "checkpoint.every_steps=12", "monitor.log_every=1", "schedule.warmup_epochs=0",
                             "schedule.epochs=3", "schedule.lr_scaling=none", "schedule.base_lr=0.002")
    assert result.steps == 12
    assert set(trainer.parts.student) == {"p7_backbone", "p7_adaptor", "same_backbone"}  # equal widths: no adaptor
    records = [r for r in read_metrics(tmp_path / "f") if "total_loss" in r]
    assert records[-1]["teacher_forwards"] == 2 * 12  # global + local group, shared by both students
    for name in ("p7", "same"):
        first = sum(r[f"{name}/total"] for r in records[:3])
        last = sum(r[f"{name}/total"] for r in records[-3:])
        assert last < 0.6 * first, (name, first, last)
    art = load_artifact(tmp_path / "f" / "artifacts" / "p7")
    prov = art.card.provenance
    assert prov.parent_sha256 == sha256_file(official_pth) and prov.details["teacher_kind"] == "official"
    assert art.heads == {} and art.card.architecture.patch_size == 7


def test_student_initialised_from_an_artifact(tmp_path: Path, pretrained_teacher: Path) -> None:
    cfg = load_distill_config("tiny", [f"run_dir={tmp_path / 'i'}", f"teacher.path={pretrained_teacher}", *FAST,
                                       f"students=[{{name: copy, init: {pretrained_teacher}}}]", "train.max_steps=1"])
    trainer = distill_trainer(cfg)
    start = load_artifact(pretrained_teacher).backbone.state_dict()
    got = trainer.parts.student["copy_backbone"].state_dict()
    assert all(torch.equal(start[k], got[k]) for k in start)  # architecture and weights from the artifact
    trainer.run()
    card = json.loads((tmp_path / "i" / "artifacts" / "copy" / "model.json").read_text())
    assert card["provenance"]["details"]["student_init"] == str(pretrained_teacher)


def test_separate_ibot_head_and_another_patch_size(tmp_path: Path, pretrained_teacher: Path) -> None:
    """A teacher with a separate iBOT head (K=48) and patch 7 distilled into a patch-14 student (grid 4 -> 2)."""
    art = load_artifact(pretrained_teacher)
    torch.manual_seed(5)
    ibot = DINOHead(HeadConfig(in_dim=32, out_dim=48, hidden_dim=40, bottleneck_dim=24))
    teacher = save_artifact(tmp_path / "teacher2", art.backbone, name="two-heads", provenance=art.card.provenance,
                            preprocessing=art.card.preprocessing, heads={**art.heads, "ibot_head": ibot})
    student = ("students=[{name: p14, backbone: {embed_dim: 16, depth: 1, num_heads: 2, patch_size: 14, "
               "img_size: 28, layerscale_init: 0.1}}]")
    trainer, result = _train(tmp_path / "r", teacher, student, "train.max_steps=3", "checkpoint.every_steps=3",
                             "monitor.log_every=1", "head.hidden_dim=32")
    assert result.steps == 3
    # iBOT targets: the teacher's 4x4 patch grid averaged onto the student's 2x2 grid (2x2 block means), every
    # patch selected, then the teacher's separate iBOT head
    meta = trainer.parts.model
    batch = meta._loss_batch(trainer.parts.batches[0][0])
    raw = meta._teacher_logits(meta._student_views()[0], batch)
    with torch.no_grad():
        tokens = art.backbone.forward_dino(batch["global_crops"])["x_norm_patchtokens"]  # [16, 16, 32]
        blocks = tokens.reshape(16, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(16 * 4, 32)  # [2B * 4, 32]
        expect = ibot(blocks)
    assert raw.dino_logits.shape == (16, 64) and raw.ibot_logits.shape == (64, 48)
    torch.testing.assert_close(raw.ibot_logits, expect, rtol=0, atol=1e-5)
    rec = [r for r in read_metrics(tmp_path / "r") if "total_loss" in r][-1]
    assert math.isfinite(rec["p14/ibot_loss"]) and rec["p14/ibot_loss"] > 0
    card = load_artifact(tmp_path / "r" / "artifacts" / "p14").card
    assert card.heads["dino_head"].out_dim == 64 and card.heads["ibot_head"].out_dim == 48
    assert card.heads["ibot_head"].hidden_dim == 32 and card.heads["ibot_head"].bottleneck_dim == 24


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path: Path, pretrained_teacher: Path) -> None:
    finals = {}
    for key, flag in (("plain", "false"), ("ac", "true")):
        trainer, _ = _train(tmp_path / key, pretrained_teacher, "train.max_steps=2", "checkpoint.every_steps=2",
                            f"parallel.activation_checkpointing={flag}")
        assert trainer.parts.student["small_backbone"].grad_checkpointing is (flag == "true")
        finals[key] = load_checkpoint(checkpoint_path(tmp_path / key / "checkpoints", 2))["student"]
    for name, value in finals["plain"].items():
        torch.testing.assert_close(finals["ac"][name], value, rtol=1e-5, atol=1e-6, msg=name)
