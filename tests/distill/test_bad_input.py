"""Bad input through the real CLI: one clear message, exit status 2, nothing lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dinoforge.core.artifact import load_artifact, save_artifact
from dinoforge.core.cli import main as cli_main
from dinoforge.core.config import config_to_yaml
from dinoforge.distill.config import bundled_recipes, load_distill_config
from dinoforge.pretrain.checkpointing import list_checkpoints
from tests.distill.conftest import FAST


def _distill(run_dir: Path, teacher: Path | str, *overrides: str) -> int:
    return cli_main(["distill", "--config", "tiny", f"run_dir={run_dir}", f"teacher.path={teacher}", *FAST,
                     *overrides])


@pytest.mark.parametrize(("args", "message"), [
    (["head.koleo_loss_weightt=0"], "unknown key 'head.koleo_loss_weightt'"),
    (["mode=distil"], "mode: Input should be 'head' or 'feature'"),
    (["students=[]"], "students: List should have at least 1 item"),
    (["students=[{name: a, arch: test}, {name: a, arch: test}]"], "repeated: ['a']"),
    (["students=[{name: a}]"], "student 'a': give arch, backbone or init"),
    (["students=[{name: a, arch: vit_nope}]"], "unknown architecture 'vit_nope'"),
    (["students=[{name: a, backbone: {embed_dim: 30, num_heads: 4}}]"], "not divisible by num_heads"),
    (["students=[{name: 1a, arch: test}]"], "students.0.name"),
    (["feature.cls_cosine_weight=0", "feature.cls_smooth_l1_weight=0", "feature.patch_cosine_weight=0",
      "feature.patch_smooth_l1_weight=0"], "nothing to train"),
    (["crops.global_crops_size=30"], "global_crops_size=30 is not a multiple of the teacher patch size 7"),
    (["students=[{name: a, arch: test_p16}]"], "is not a multiple of the student 'a' patch size 16"),
    ([("students=[{name: a, backbone: {embed_dim: 16, depth: 1, num_heads: 2, patch_size: 7, img_size: 28}}, "
       "{name: b, backbone: {embed_dim: 16, depth: 1, num_heads: 2, patch_size: 14, img_size: 28}}]"),
      "crops.local_crops_size=14"], "mode: head needs every student on one patch grid"),
    (["data.source=folder:/nonexistent/images"], "does not exist"),
    (["train.device=cuda:0"], "no CUDA GPU"),
    (["parallel.strategy=ddp"], "needs torchrun"),
])
def test_bad_recipe_exits_2_with_a_message(tmp_path: Path, pretrained_teacher: Path, capsys, args: list[str],
                                           message: str) -> None:
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _distill(tmp_path / "r", pretrained_teacher, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinoforge distill: error:") and message in err, err


def test_bad_teachers_exit_2(tmp_path: Path, official_pth: Path, pretrained_teacher: Path, capsys) -> None:
    assert _distill(tmp_path / "a", tmp_path / "missing") == 2
    assert "teacher.path" in capsys.readouterr().err
    assert _distill(tmp_path / "b", official_pth, "teacher.num_heads=2", "crops.global_crops_size=28") == 2
    assert "mode: head needs a teacher with a DINO head" in capsys.readouterr().err
    assert _distill(tmp_path / "d", official_pth, "mode=feature", "crops.global_crops_size=35",
                    "crops.local_crops_size=21") == 2
    assert "global_crops_size=35 is not a multiple of the teacher patch size 14" in capsys.readouterr().err
    student = f"students=[{{name: s, arch: test, init: {pretrained_teacher}}}]"  # 64-wide arch, 32-wide init
    assert _distill(tmp_path / "e", pretrained_teacher, student, "crops.global_crops_size=56",
                    "crops.local_crops_size=28") == 2
    err = capsys.readouterr().err
    assert "student 's': init" in err and "does not fit its architecture" in err


def test_resume_refuses_changed_students_or_teacher(tmp_path: Path, pretrained_teacher: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _distill(run, pretrained_teacher, "train.max_steps=2", "checkpoint.every_steps=2") == 0
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    capsys.readouterr()
    other = "students=[{name: small, backbone: {embed_dim: 32, depth: 2, num_heads: 2, patch_size: 7, img_size: 28}}]"
    assert _distill(run, pretrained_teacher, other) == 2
    assert "'students' changed" in capsys.readouterr().err
    # same path, other weights: the teacher's hash is recorded in every checkpoint
    moved = tmp_path / "teacher_copy"
    shutil.copytree(pretrained_teacher, moved)
    assert _distill(tmp_path / "run2", moved, "train.max_steps=1", "checkpoint.every_steps=1") == 0
    art = load_artifact(moved)
    with torch.no_grad():
        art.backbone.cls_token.add_(1.0)
    save_artifact(moved, art.backbone, name=art.card.name, provenance=art.card.provenance, heads=art.heads,
                  preprocessing=art.card.preprocessing, overwrite=True)
    capsys.readouterr()
    assert _distill(tmp_path / "run2", moved, "train.max_steps=2") == 2
    assert "the teacher" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(tmp_path / "run2" / "checkpoints")] == [1]  # nothing lost
    # a pretraining run directory is not a distillation run
    assert cli_main(["pretrain", "--config", "tiny", f"run_dir={tmp_path / 'p'}", "train.threads=1",
                     "train.max_steps=1", "checkpoint.every_steps=1"]) == 0
    capsys.readouterr()
    assert _distill(tmp_path / "p", pretrained_teacher) == 2
    assert "holds a pretraining run" in capsys.readouterr().err


def test_bundled_recipes_validate() -> None:
    names = bundled_recipes()
    assert {"tiny", "fmnist", "fmnist_head", "vits14_from_vitb14"} <= set(names)
    for name in names:
        cfg = load_distill_config(name, ["run_dir=x"])
        assert config_to_yaml(cfg).startswith("run_dir: x")
