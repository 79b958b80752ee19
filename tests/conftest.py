"""Shared pytest fixtures: paths to real data, golden fixtures and a tiny model artifact.

Real data used by the tests (installed by ``make test``):

* ``../shared/fixtures/dinov2/``: golden outputs of the official DINOv2 code;
* Debian ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/*.gz``;
* the ``foolbox`` wheel's ``data/`` folder: 20 real images each of CIFAR-10/100, ImageNet, MNIST, F-MNIST;
* Debian ``tuxpaint-stamps-default``: labelled colour PNGs under ``/usr/share/tuxpaint/stamps``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(os.environ.get("DINOFORGE_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "dinov2"))
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")


def _foolbox_data_dir() -> Path | None:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official DINOv2 golden fixtures (``../shared/fixtures/dinov2`` beside the checkout).

    They live outside the repository: a checkout cloned alone skips the tests that compare against them (and
    says why) instead of failing them. CI has the folder, so there they run.
    """
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"{FIXTURES_DIR} not found: the official DINOv2 golden fixtures live beside the checkout "
                    "(../shared/fixtures/dinov2); set DINOFORGE_FIXTURES to use another copy")
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Fashion-MNIST IDX files from the Debian package."""
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Debian package dataset-fashion-mnist is not installed (run `make test`)")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """100 real PNG images shipped in the foolbox wheel (cifar10_*, cifar100_*, imagenet_*, mnist_*, ...)."""
    path = _foolbox_data_dir()
    if path is None:
        pytest.fail("foolbox sample images are missing (run `make test`)")
    return path


@pytest.fixture(scope="session")
def tuxpaint_dir() -> Path:
    """Labelled colour stamps from the Debian package tuxpaint-stamps-default."""
    if not TUXPAINT_DIR.is_dir():
        pytest.fail("Debian package tuxpaint-stamps-default is not installed (run `make test`)")
    return TUXPAINT_DIR


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One torch thread for the test: on tiny tensors a second OpenMP thread only waits on the first.

    Used by the files of many small-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``);
    the thread count is restored afterwards so the tests that measure or parallelise keep the default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ``test`` backbone (D=64, depth 2, patch 14) saved as an artifact, 56 px input."""
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = build_backbone("test")
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    pre = PreprocessConfig(mode="center_crop", size=56, resize_size=64, patch_size=14)
    return save_artifact(out, model, name="tiny-test", provenance=Provenance(source="random-init"),
                         preprocessing=pre)


@pytest.fixture(scope="session")
def tiny_reg_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like :func:`tiny_artifact` with 4 register tokens (official register interpolation mode)."""
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import build_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    torch.manual_seed(1)
    model = build_backbone("test_reg4")
    out = tmp_path_factory.mktemp("artifacts") / "tiny_reg4"
    pre = PreprocessConfig(mode="center_crop", size=56, resize_size=64, patch_size=14)
    return save_artifact(out, model, name="tiny-test-reg4", provenance=Provenance(source="random-init"),
                         preprocessing=pre)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of a local HTTP server over a fresh folder."""
    root = tmp_path / "www"
    root.mkdir()
    from tests.helpers import serve_folder

    with serve_folder(root) as url:
        yield root, url
