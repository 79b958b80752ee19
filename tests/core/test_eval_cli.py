"""``dinoforge eval`` end to end on real data: tables, JSON reports equal to the Python API, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dinoforge.core.cli import main
from dinoforge.core.data import open_source
from dinoforge.core.eval import extract_features, knn_classify, load_eval_model
from tests.core.helpers import make_labelled_folder, write_corrupt_jpeg


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def test_knn_report_matches_python_api(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "knn.json"
    code = main(["eval", "knn", "--model", str(tiny_artifact), "--train", "fmnist:train[~300@1]",
                 "--test", "fmnist:test[:100]", "--pooling", "cls,mean", "--ks", "5,10", "--batch-size", "64",
                 "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "| cls | 5 |" in printed and "| mean | 10 |" in printed
    report = json.loads(out.read_text())
    assert report["task"] == "knn" and report["model"]["kind"] == "artifact"
    assert report["train"]["samples"] == 300 and report["test"]["spec"] == "fmnist:test[:100]"
    assert report["preprocessing"]["size"] == 56 and report["settings"]["ks"] == [5, 10]
    model = load_eval_model(tiny_artifact, poolings=("cls", "mean"))
    train = extract_features(model.extractor, open_source("fmnist:train[~300@1]"), preprocess=model.preprocess,
                             progress=False)
    test = extract_features(model.extractor, open_source("fmnist:test[:100]"), preprocess=model.preprocess,
                            progress=False)
    for pooling in ("cls", "mean"):
        ref = knn_classify(train[pooling], train.labels, test[pooling], test.labels, ks=(5, 10), num_classes=10)
        got = report["results"][pooling]
        assert got["top1"] == {str(k): v for k, v in ref.top1.items()}
        assert got["top5"] == {str(k): v for k, v in ref.top5.items()}


def test_knn_on_folders_with_a_corrupt_jpeg(sample_images_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    make_labelled_folder(sample_images_dir, tmp_path / "train", per_class=5)
    (tmp_path / "test").mkdir()
    shutil.copytree(tmp_path / "train" / "mnist", tmp_path / "test" / "mnist")  # test has one class only
    write_corrupt_jpeg(tmp_path / "train" / "imagenet" / "broken.jpg", sample_images_dir)
    out = tmp_path / "r.json"
    code = main(["eval", "knn", "--model", "pixels", "--train", f"folder:{tmp_path / 'train'}",
                 "--test", str(tmp_path / "test"), "--ks", "1,3", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["train"]["skipped"]["bad"] == 1
    assert report["train"]["skipped"]["bad_samples"][0]["id"] == "imagenet/broken.jpg"
    # Test labels use the training class indices (mnist is class 2 of cifar10/imagenet/mnist).
    assert report["test"]["classes"] == ["cifar10", "imagenet", "mnist"]
    assert report["results"]["pixels"]["top1"]["1"] == 100.0  # each test image is in train
    assert "1 skipped" in capsys.readouterr().out


def test_linear_and_retrieval_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lin.json"
    code = main(["eval", "linear", "--model", "pixels", "--train", "fmnist:train[~600]", "--test",
                 "fmnist:test[:200]", "--lrs", "0.01,0.1", "--wds", "0", "--epochs", "3", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    res = json.loads(out.read_text())["results"]["pixels"]
    assert res["best_lr"] in (0.01, 0.1) and len(res["sweep"]) == 2 and res["top1"] > 50
    out = tmp_path / "ret.json"
    code = main(["eval", "retrieval", "--model", "pixels", "--query", "fmnist:test[:150]", "--gallery",
                 "fmnist:test[:150]", "--ks", "1,5", "--out", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    assert code == 0 and report["settings"]["exclude_self"] is True
    assert 30 < report["results"]["pixels"]["recall"]["1"] < 100
    assert "R@5" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--train", "webdav:/x", "--test", "fmnist:test"], "unknown data source scheme 'webdav'"),
    (["--train", "fmnist:train[:10]", "--test", "manifest:/no/such/list.csv"], "does not exist"),
    (["--train", "fmnist:train[:10]", "--test", "fmnist:test[:5]", "--pooling", "max"], "unknown pooling"),
    (["--train", "fmnist:train[:10]", "--test", "fmnist:test[:5]", "--preprocess", "mode=stretch"], "mode"),
])
def test_bad_input_exits_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code = main(["eval", "knn", "--model", "pixels", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("temperature", ["0", "-0.07", "nan"])
def test_bad_temperature_fails_before_any_data_is_read(temperature: str, capsys: pytest.CaptureFixture) -> None:
    # the test spec does not exist: the temperature error proves nothing was opened or extracted first
    code = main(["eval", "knn", "--model", "pixels", "--no-progress", "--train", "fmnist:train",
                 "--test", "manifest:/no/such/list.csv", "--temperature", temperature])
    err = capsys.readouterr().err
    assert code == 2 and "temperature must be positive" in err and "does not exist" not in err


def test_unlabelled_data_and_missing_model(sample_images_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    for f in sorted(sample_images_dir.glob("cifar10_*"))[:4]:
        shutil.copy(f, tmp_path / f.name)
    code = main(["eval", "knn", "--model", "pixels", "--train", str(tmp_path), "--test", str(tmp_path),
                 "--no-progress"])
    assert code == 2 and "k-NN needs labels" in capsys.readouterr().err
    code = main(["eval", "knn", "--model", str(tmp_path / "nothing"), "--train", "fmnist:test[:5]", "--test",
                 "fmnist:test[:5]"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "knn", "--model", "pixels", "--train", "a", "--test", "b", "--ks", "0,-1"])
    assert exc.value.code == 2
