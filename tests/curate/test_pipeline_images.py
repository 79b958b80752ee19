"""``dinoforge curate`` end to end on real images with a model artifact: files, manifest, plots, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dinoforge.core.cli import main as cli_main
from dinoforge.core.data import ManifestSource, Sample


def make_sets(sample_images_dir: Path, tuxpaint_dir: Path, root: Path) -> dict[str, Path]:
    """Pool: foolbox + 40 tuxpaint stamps + a byte-identical copy + a corrupt file; seeds; an eval set."""
    pool, seeds, evals = root / "pool", root / "seeds", root / "evals"
    for d in (pool, seeds, evals):
        d.mkdir(parents=True)
    for f in sorted(sample_images_dir.glob("*.*")):
        shutil.copy(f, pool / f.name)
    for f in sorted(tuxpaint_dir.rglob("*.png"))[:40]:
        shutil.copy(f, pool / f"tux_{f.name}")
    shutil.copy(pool / "cifar10_00_3.png", pool / "zz_exact_copy.png")
    (pool / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for f in sorted(sample_images_dir.glob("cifar10_*"))[:6]:
        shutil.copy(f, seeds / f.name)
    for f in sorted(sample_images_dir.glob("imagenet_*"))[:3]:
        shutil.copy(f, evals / f.name)
    return {"pool": pool, "seeds": seeds, "evals": evals}


def write_recipe(path: Path, sets: dict[str, Path], artifact: Path, out: Path) -> Path:
    recipe = {"output": str(out), "pool": str(sets["pool"]), "seeds": {"cifar": str(sets["seeds"])},
              "eval_sets": {"imagenet": str(sets["evals"])},
              "embed": {"model": str(artifact), "shard_size": 50, "num_workers": 0, "batch_size": 32},
              "dedup": {"k": 8, "threshold": 0.999}, "relative": {"threshold": 0.999},
              "retrieval": {"sample": {"k": 3},
                            "cluster": {"enabled": True, "num_clusters": 6, "min_seed_hits": 2, "per_cluster": 4}},
              "balance": {"enabled": True, "target_size": 12, "levels": [6, 2]},
              "manifest": {"grid_seeds": 3}}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_curate_cli_end_to_end(tiny_artifact: Path, sample_images_dir: Path, tuxpaint_dir: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = make_sets(sample_images_dir, tuxpaint_dir, tmp_path / "data")
    recipe = write_recipe(tmp_path / "recipe.yaml", sets, tiny_artifact, tmp_path / "run")
    assert cli_main(["curate", "--config", str(recipe)]) == 0
    assert "curated" in capsys.readouterr().out
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    # The corrupt file is skipped and listed by the embed step; the byte-identical copy is an exact duplicate.
    embed = report["steps"]["embed"]
    assert sum(v.get("bad", 0) for v in embed.values() if isinstance(v, dict)) == 1
    removed = pd.read_parquet(run / "dedup" / "removed.parquet")
    exact = removed[removed["reason"] == "exact"]
    assert exact["id"].tolist() == ["zz_exact_copy.png"]
    # Every eval image is also in the pool: relative dedup removes those (similarity 1 >= 0.999).
    relative = pd.read_parquet(run / "relative" / "removed.parquet")
    assert sorted(relative["id"]) == sorted(p.name for p in sets["evals"].iterdir())
    # The manifest is a data-layer manifest: readable as a source, files exist, extra columns kept.
    manifest = ManifestSource(run / "manifest.csv")
    assert 0 < len(manifest) <= 12 and {"seed_set", "step", "similarity"} <= set(manifest.extra_columns)
    assert all(isinstance(s, Sample) for s in manifest)
    ids = {manifest.record(i).id for i in range(len(manifest))}
    assert not ids & set(relative["id"]) and not ids & set(removed["id"])
    assert {"plots/cluster-sizes.png", "plots/retrieved-cifar.png"} <= set(report["plots"])
    assert all((run / p).stat().st_size > 1000 for p in report["plots"])
    # A second run finds every step done.
    assert cli_main(["curate", "--config", str(recipe)]) == 0
    assert json.loads((run / "report.json").read_text())["rows"] == report["rows"]


def test_curate_bad_recipes_are_clear_errors(tmp_path: Path, tiny_artifact: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "pool": str(tmp_path),
                                      "embed": {"model": str(tiny_artifact)}, "dedup": {"treshold": 0.5}}))
    assert cli_main(["curate", "--config", str(recipe)]) == 2
    assert "unknown key 'dedup.treshold'" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "pool": "folder:/nonexistent/pool",
                                      "embed": {"model": str(tiny_artifact)}}))
    assert cli_main(["curate", "--config", str(recipe)]) == 2
    assert "/nonexistent/pool" in capsys.readouterr().err
    assert cli_main(["curate", "--config", str(recipe), "balance.levels=[2,5]"]) == 2
    assert "non-increasing" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "pool": "x"}))
    assert cli_main(["curate", "--config", str(recipe)]) == 2
    assert "missing required key 'embed'" in capsys.readouterr().err
