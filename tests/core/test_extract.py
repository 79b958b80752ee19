"""Batch extraction on real images: features against a direct forward pass, bad files, formats, WebDataset."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoforge.core.artifact import load_artifact
from dinoforge.core.cli import main as cli_main
from dinoforge.core.data import open_source
from dinoforge.core.errors import DataError
from dinoforge.core.extract import ExtractConfig, FeatureStore, run_extraction
from dinoforge.core.extract.writer import NpyAppender
from dinoforge.core.preprocess import preprocess_image


def make_pool(sample_images_dir: Path, root: Path, n: int = 24) -> list[str]:
    """Copy ``n`` real images into ``root`` and add one corrupt JPEG; returns the good relative names."""
    root.mkdir(parents=True)
    names = []
    for f in sorted(sample_images_dir.glob("*.*"))[:n]:
        shutil.copy(f, root / f.name)
        names.append(f.name)
    data = next(sample_images_dir.glob("imagenet_*.jpg")).read_bytes()
    (root / "broken.jpg").write_bytes(data[: len(data) // 3])
    return sorted(names)


def reference_features(artifact: Path, folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """cls / mean / patch of each image, one image at a time, straight from the backbone."""
    art = load_artifact(artifact)
    src = open_source(f"folder:{folder}")
    by_id = {src.record(i).id: i for i in range(len(src))}
    out: dict[str, list[np.ndarray]] = {"cls": [], "mean": [], "patch": []}
    with torch.inference_mode():
        for name in names:
            pixels = preprocess_image(src[by_id[name]].image, art.card.preprocessing)[None]
            feats = art.backbone.forward_dino(pixels)
            out["cls"].append(feats["x_norm_clstoken"][0].numpy())
            out["patch"].append(feats["x_norm_patchtokens"][0].numpy())
            out["mean"].append(feats["x_norm_patchtokens"][0].mean(0).numpy())
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_features_match_direct_forward_and_bad_file_listed(tiny_artifact: Path, sample_images_dir: Path,
                                                           tmp_path: Path, fmt: str) -> None:
    names = make_pool(sample_images_dir, tmp_path / "pool")
    cfg = ExtractConfig(model=str(tiny_artifact), input=str(tmp_path / "pool"), output=str(tmp_path / "out"),
                        shard_size=10, features=("cls", "mean", "patch"), dtype="float32", format=fmt,
                        batch_size=4, num_workers=1, progress=False)
    result = run_extraction(cfg)
    assert result.complete and result.rows_now == len(names) and result.bad_now == 1
    store = FeatureStore(tmp_path / "out")
    table = store.table().to_pandas()
    assert list(table["id"]) == names  # every good input once, in folder order
    assert list(table["global_row"]) == list(range(len(names)))
    assert table["path"].tolist() == [str((tmp_path / "pool" / n).resolve()) for n in names] or \
        table["path"].tolist() == [str(tmp_path / "pool" / n) for n in names]
    bad = store.bad().to_pandas()
    assert bad["id"].tolist() == ["broken.jpg"] and "decodable" in bad["reason"][0]
    ref = reference_features(tiny_artifact, tmp_path / "pool", names)
    for name in ("cls", "mean", "patch"):
        got = store.load(name)
        assert got.dtype == np.float32 and got.shape == ref[name].shape
        np.testing.assert_allclose(got, ref[name], atol=2e-5, rtol=1e-4)
    vecs = store.vectors("cls")
    np.testing.assert_allclose(vecs.take(np.array([len(names) - 1, 0])), ref["cls"][[-1, 0]], atol=2e-5)


def test_float16_shards_are_memmaps_and_rerun_is_idempotent(tiny_artifact: Path, sample_images_dir: Path,
                                                             tmp_path: Path) -> None:
    make_pool(sample_images_dir, tmp_path / "pool", n=12)
    cfg = ExtractConfig(model=str(tiny_artifact), input=str(tmp_path / "pool"), output=str(tmp_path / "out"),
                        shard_size=5, num_workers=0, batch_size=3, progress=False)
    first = run_extraction(cfg)
    arrays = FeatureStore(tmp_path / "out").part_arrays("cls")
    assert [a.shape[0] for a in arrays] == [4, 5, 3]  # broken.jpg (skipped) sorts first
    assert all(isinstance(a, np.memmap) for a in arrays)
    assert all(a.dtype == np.float16 for a in arrays)
    before = FeatureStore(tmp_path / "out").load("cls")
    again = run_extraction(cfg)  # nothing left to do
    assert first.complete and again.complete and again.units_done_now == 0 and again.rows_now == 0
    np.testing.assert_array_equal(FeatureStore(tmp_path / "out").load("cls"), before)


def test_other_job_in_output_is_refused(tiny_artifact: Path, sample_images_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    make_pool(sample_images_dir, tmp_path / "pool", n=6)
    args = ["extract", "--model", str(tiny_artifact), "--input", str(tmp_path / "pool"), "--output",
            str(tmp_path / "out"), "--shard-size", "4", "--num-workers", "0", "--no-progress"]
    assert cli_main(args) == 0
    assert cli_main([*args[:-1], "--features", "mean", "--no-progress"]) == 2
    assert "another extraction job (different features)" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    bad_out = [a if a != str(tmp_path / "out") else str(tmp_path / "junk") for a in args]
    assert cli_main(bad_out) == 2
    assert "not an extraction output" in capsys.readouterr().err
    with pytest.raises(DataError, match="not an extraction output"):
        FeatureStore(tmp_path / "junk")


def test_max_units_then_resume_completes(tiny_artifact: Path, sample_images_dir: Path, tmp_path: Path) -> None:
    names = make_pool(sample_images_dir, tmp_path / "pool", n=10)
    cfg = ExtractConfig(model=str(tiny_artifact), input=str(tmp_path / "pool"), output=str(tmp_path / "out"),
                        shard_size=3, num_workers=0, progress=False, max_units=2)
    part = run_extraction(cfg)
    assert not part.complete and part.units_done_now == 2 and not (tmp_path / "out" / "index.parquet").exists()
    with pytest.raises(DataError, match="has not finished"):
        FeatureStore(tmp_path / "out")
    rest = run_extraction(cfg.model_copy(update={"max_units": None}))
    assert rest.complete and rest.units_done_now == 2
    assert FeatureStore(tmp_path / "out").table()["id"].to_pylist() == names


def write_tars(sample_images_dir: Path, root: Path) -> list[str]:
    """Two WebDataset tars of real images (the second also holds a member that is not an image)."""
    root.mkdir()
    files = sorted(sample_images_dir.glob("*.png"))[:9]
    keys = []
    for t, chunk in enumerate((files[:5], files[5:])):
        with tarfile.open(root / f"shard-{t:02d}.tar", "w") as tar:
            for f in chunk:
                tar.add(f, arcname=f"{f.stem}.png")
                keys.append(f"shard-{t:02d}.tar/{f.stem}")
            if t == 1:
                junk = root / "junk.png"
                junk.write_bytes(b"not a png at all")
                tar.add(junk, arcname="junk.png")
    return keys


def test_webdataset_units_with_two_workers(tiny_artifact: Path, sample_images_dir: Path, tmp_path: Path) -> None:
    keys = write_tars(sample_images_dir, tmp_path / "wds")
    cfg = ExtractConfig(model=str(tiny_artifact), input=f"wds:{tmp_path}/wds/shard-{{00..01}}.tar",
                        output=str(tmp_path / "out"), shard_size=2, num_workers=2, batch_size=2, progress=False)
    result = run_extraction(cfg)
    store = FeatureStore(tmp_path / "out")
    ids = store.table()["id"].to_pylist()
    assert result.complete and sorted(ids) == sorted(keys) and len(ids) == len(set(ids))
    assert ids == keys  # units (tars) in order, rows in tar order, whatever worker finished first
    assert store.bad()["id"].to_pylist() == ["shard-01.tar/junk"]
    assert [a.shape[0] for a in store.part_arrays("cls")] == [2, 2, 1, 2, 2]  # parts of shard_size rows


def test_webdataset_shards_over_http_give_the_local_features(tiny_artifact: Path, sample_images_dir: Path,
                                                            tmp_path: Path, http_root: tuple[Path, str]) -> None:
    """Remote shards (fsspec over a plain HTTP server) extract to the same rows as the same tars on disk."""
    root, url = http_root
    keys = write_tars(sample_images_dir, root / "wds")
    stores = {}
    for name, base in (("local", f"{root}/wds"), ("http", f"{url}/wds")):
        cfg = ExtractConfig(model=str(tiny_artifact), input=f"wds:{base}/shard-{{00..01}}.tar",
                            output=str(tmp_path / name), shard_size=3, num_workers=1, batch_size=2, progress=False)
        assert run_extraction(cfg).complete
        stores[name] = FeatureStore(tmp_path / name)
    assert stores["http"].table()["id"].to_pylist() == stores["local"].table()["id"].to_pylist() == keys
    np.testing.assert_array_equal(stores["http"].load("cls"), stores["local"].load("cls"))
    assert stores["http"].bad()["id"].to_pylist() == ["shard-01.tar/junk"]


def test_npy_appender_writes_standard_npy(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 3, 5)).astype(np.float16)
    app = NpyAppender(path, (3, 5), np.float16, max_rows=123_456)
    app.append(rows[:4])
    app.append(rows[4:])
    app.close()
    np.testing.assert_array_equal(np.load(path), rows)
    assert np.load(path, mmap_mode="r").shape == (7, 3, 5)
    with pytest.raises(ValueError, match="do not match"):
        NpyAppender(tmp_path / "y.npy", (3,), np.float32, 2).append(np.zeros((1, 4)))


def test_pixels_baseline_and_feature_model_mismatch(tmp_path: Path) -> None:
    from dinoforge.core.errors import ConfigError
    from dinoforge.core.eval.model import PIXEL_CONTRACT

    cfg = ExtractConfig(model="pixels", input="fmnist:test[:20]", output=str(tmp_path / "px"), features=("pixels",),
                        dtype="float32", num_workers=0, progress=False)
    run_extraction(cfg)
    got = FeatureStore(tmp_path / "px").load("pixels")
    src = open_source("fmnist:test[:20]")
    ref = np.stack([preprocess_image(src[i].image, PIXEL_CONTRACT).flatten().numpy() for i in range(20)])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    with pytest.raises(ConfigError, match="goes with --model pixels"):
        run_extraction(cfg.model_copy(update={"features": ("cls",), "output": str(tmp_path / "x")}))
