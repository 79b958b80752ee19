"""``dinoforge viz pca`` and ``dinoforge viz neighbours`` on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoforge.core.cli import main as cli_main
from dinoforge.serve.index_build import open_backend
from dinoforge.serve.patch_pca import patch_pca
from dinoforge.serve.viz import TILE, _patch_tokens


@pytest.fixture(scope="module")
def photos(sample_images_dir: Path) -> list[Path]:
    """Three real ImageNet photos from the foolbox sample images."""
    return sorted(sample_images_dir.glob("imagenet_*"))[:3]


def test_pca_writes_one_picture_per_image_and_a_joint_one(tiny_artifact: Path, photos: list[Path],
                                                          tmp_path: Path) -> None:
    assert cli_main(["viz", "pca", "--model", str(tiny_artifact), *map(str, photos), "--out", str(tmp_path)]) == 0
    for path in photos:
        picture = np.asarray(Image.open(tmp_path / f"{path.stem}.pca.png"))
        assert picture.shape == (TILE, 2 * TILE, 3)
        assert len(np.unique(picture[:, TILE:].reshape(-1, 3), axis=0)) > 3  # coloured patches, not blank
    joint = np.asarray(Image.open(tmp_path / "joint.pca.png"))
    assert joint.shape == (3 * TILE, 2 * TILE, 3)
    # the joint sheet's PCA half is the joint PCA of the same tokens (the one function behind the API route)
    backend = open_backend(tiny_artifact)
    tokens = [_patch_tokens(backend, Image.open(p).convert("RGB")) for p in photos]
    expected = patch_pca([t for t, _ in tokens], [g for _, g in tokens])[0].rgb  # [4, 4, 3]
    block = TILE // expected.shape[0]
    np.testing.assert_array_equal(joint[block // 2:TILE:block, TILE + block // 2::block], expected)


def test_neighbours_grid_and_bad_input(tiny_artifact: Path, photos: list[Path], sample_images_dir: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "idx"
    assert cli_main(["index", "build", "--model", str(tiny_artifact), "--input", str(sample_images_dir),
                     "--index", str(index), "--num-workers", "0", "--no-progress"]) == 0
    assert cli_main(["viz", "neighbours", "--model", str(tiny_artifact), "--index", str(index), *map(str, photos),
                     "--out", str(tmp_path / "out"), "--k", "4"]) == 0
    grid = Image.open(tmp_path / "out" / "neighbours.png")
    assert grid.size == (5 * (TILE // 2), 3 * (TILE // 2 + 18))
    capsys.readouterr()
    assert cli_main(["viz", "neighbours", "--model", str(tiny_artifact), "--index", str(tmp_path / "none"),
                     str(photos[0]), "--out", str(tmp_path / "o2")]) == 2
    assert "holds no index" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert cli_main(["viz", "pca", "--model", str(tiny_artifact), str(text), "--out", str(tmp_path / "o3")]) == 2
    assert "notes.txt" in capsys.readouterr().err
