"""``dinoforge dedup`` for real: scikit-image photos with injected copies, resumed, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoforge.core.cli import main
from dinoforge.curate import edits
from dinoforge.curate.copynet import DEFAULT_HEAD

skimage = pytest.importorskip("skimage")
ORIGINALS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "hubble_deep_field.jpg", "ihc.png")
#: (original, edit family) of the injected copies; each copy is also shrunk so the original is the largest.
COPIES = (("astronaut.png", "crop+overlay"), ("coffee.png", "jpeg"), ("rocket.jpg", "text"),
          ("chelsea.png", "flip"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dedup-input")
    data = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(0)
    for name in ORIGINALS:
        with Image.open(data / name) as im:
            image = im.convert("RGB")
        image.thumbnail((256, 256))
        image.save(root / f"{Path(name).stem}.png")
    (root / "copies").mkdir()
    for name, family in COPIES:
        copy = edits.apply(family, Image.open(root / f"{Path(name).stem}.png"), rng)
        copy.thumbnail((180, 180))
        copy.save(root / "copies" / f"{Path(name).stem}-{family.replace('+', '_')}.jpg", quality=90)
    return root


def test_dedup_groups_copies_and_resumes(folder: Path, tmp_path: Path) -> None:
    assert DEFAULT_HEAD.is_file(), f"the shipped copy head {DEFAULT_HEAD} is missing"
    out = tmp_path / "out"
    assert main(["dedup", str(folder), "--out", str(out)]) == 0
    groups = pd.read_csv(out / "groups.csv")
    kept = pd.read_csv(out / "kept.csv")
    assert sorted(kept.path) == sorted(f"{Path(n).stem}.png" for n in ORIGINALS)  # every copy removed
    for name, _ in COPIES:
        group = groups[groups.path == f"{Path(name).stem}.png"].group.iloc[0]
        members = groups[groups.group == group]
        assert len(members) == 2 and (members.role == "copy").sum() == 1  # its copy, nothing else
    assert Image.open(out / "groups.png").format == "PNG"
    part = out / "embed" / "part-00000.npy"
    stamp = part.stat().st_mtime_ns
    assert main(["dedup", str(folder), "--out", str(out)]) == 0  # resumed: nothing re-embedded
    assert part.stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "kept.csv").equals(kept)


def test_dedup_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dedup", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) != 0
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert main(["dedup", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) != 0
    assert "no readable image" in capsys.readouterr().err
    (tmp_path / "one").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "one" / "a.png")
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["dedup", str(tmp_path / "one"), "--out", str(tmp_path / "file" / "out")]) != 0
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path / "one"), "--out", str(tmp_path / "o"), "--threshold", "2"]) != 0
    assert "not a cosine similarity" in capsys.readouterr().err


def test_curation_stage_dedups_with_the_copy_descriptor(folder: Path, tmp_path: Path) -> None:
    """``dedup.model: copy``: the curation stage embeds with the same descriptor as ``dinoforge dedup``."""
    import pyarrow.parquet as pq
    import yaml

    from dinoforge.core.extract import FeatureStore
    from dinoforge.curate.copynet import CopyDescriptor

    held = tmp_path / "held"  # evaluation images: copies of two pool originals that have no copy in the pool
    held.mkdir()
    rng = np.random.default_rng(1)
    for name in ("retina", "ihc"):
        edits.apply("jpeg", Image.open(folder / f"{name}.png"), rng).save(held / f"{name}.jpg", quality=90)
    desc = CopyDescriptor()
    recipe = {"output": str(tmp_path / "run"), "pool": str(folder), "eval_sets": {"held": str(held)},
              "embed": {"model": "pixels", "feature": "pixels", "preprocess": ["size=32"], "num_workers": 0},
              "dedup": {"model": "copy", "threshold": desc.threshold, "linkage": "kept", "k": 4,
                        "index": {"kind": "flat"}},
              "relative": {"threshold": desc.threshold},
              "retrieval": {"sample": {"enabled": False}}, "manifest": {"plots": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["curate", "--config", str(tmp_path / "recipe.yaml")]) == 0
    run = tmp_path / "run"

    def stems(step: str) -> list[str]:
        ids = pq.read_table(run / step / "removed.parquet").column("id").to_pylist()
        return sorted(Path(i).stem.split("-")[0] for i in ids)

    assert stems("dedup") == sorted(Path(n).stem for n, _ in COPIES)  # one image of each original + copy pair
    assert stems("relative") == ["ihc", "retina"]
    store = FeatureStore(next((run / "embed").glob("pool-dedup-*")))
    table = store.table(["path"]).to_pandas()
    vectors = store.load("cls").astype(np.float32)  # [N, D], written by the extraction engine's loader
    direct = desc([Image.open(p).convert("RGB") for p in table["path"]])  # dinoforge dedup's own path
    cosine = (vectors * direct).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > 0.99, cosine  # the contract's resize + float16 storage, not another descriptor


def test_curation_copy_model_errors(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    base = {"output": str(tmp_path / "run"), "pool": str(folder), "embed": {"model": "pixels", "feature": "pixels"}}
    cases = [({"dedup": {"model": f"copy:{tmp_path / 'missing.npz'}"}}, "does not exist"),
             ({"embed": {"model": "copy"}}, "serves dedup.model only")]
    for extra, message in cases:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, **extra}))
        assert main(["curate", "--config", str(tmp_path / "r.yaml")]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "embed").exists()  # refused before any embedding
