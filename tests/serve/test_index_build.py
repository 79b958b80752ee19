"""``dinoforge index build`` on real images, then the page's API on the index: search, thumbnails, PCA, errors."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dinoforge.core.cli import main as cli_main
from dinoforge.serve.index_build import build_index
from dinoforge.serve.routes.query import rgb_array
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from dinoforge.serve.thumbnails import thumb_path
from tests.serve.helpers import onnx_index_without_patch_tokens, png_header


@pytest.fixture(scope="module")
def stamps(tuxpaint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 real tuxpaint stamps (colour PNGs with transparency), 12 from each of three categories."""
    root = tmp_path_factory.mktemp("stamps")
    for category in ("animals", "food", "vehicles"):
        files = sorted((tuxpaint_dir / category).rglob("*.png"))[:12]
        assert len(files) == 12, f"tuxpaint category {category} has too few stamps"
        (root / category).mkdir()
        for f in files:
            shutil.copy(f, root / category / f.name)
    return root


@pytest.fixture(scope="module")
def built(tiny_artifact: Path, stamps: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index = tmp_path_factory.mktemp("page_index") / "idx"
    assert cli_main(["index", "build", "--model", str(tiny_artifact), "--input", str(stamps), "--index", str(index),
                     "--batch-size", "8", "--num-workers", "0", "--no-progress"]) == 0
    return index


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, built: Path) -> Iterator[BackgroundServer]:
    settings = ServeSettings(port=0, model=tiny_artifact, index_dir=built, max_payload_bytes=2_000_000,
                             max_pixels=1_000_000)
    with BackgroundServer(settings) as srv:
        yield srv


def _query(url: str, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(url + "/v1/query", files={"file": ("q.png", data, "image/png")}, data=fields, timeout=60)


def test_build_indexes_every_image_with_a_thumbnail_and_resumes_to_the_same_index(
        built: Path, stamps: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    files = sorted(stamps.rglob("*.png"))
    ids = [str(f.relative_to(stamps)) for f in files]
    assert all(thumb_path(built, i).is_file() for i in ids)
    again = build_index(tiny_artifact, str(stamps), built, num_workers=0, progress=False)
    assert again.count == 36 and again.bad == 0 and again.thumbnails_remade == 0  # nothing redone, nothing lost
    thumb_path(built, ids[5]).unlink()
    assert build_index(tiny_artifact, str(stamps), built, num_workers=0, progress=False).thumbnails_remade == 1
    grown = tmp_path / "grown"
    shutil.copytree(stamps, grown)
    Image.open(files[0]).transpose(Image.Transpose.ROTATE_90).save(grown / "animals" / "turned.png")
    more = build_index(tiny_artifact, str(grown), built, num_workers=0, progress=False)
    assert more.count == 37 and thumb_path(built, "animals/turned.png").is_file()  # a grown folder: one more
    assert len(list((built / "extract").iterdir())) == 1  # the older job's features are gone


def test_an_indexed_image_comes_back_first_with_its_thumbnail_and_pca(server: BackgroundServer,
                                                                      stamps: Path) -> None:
    for path in sorted(stamps.rglob("*.png"))[::9]:
        body = _query(server.url, path.read_bytes(), top_k="5").json()
        top = body["matches"][0]
        # not exactly 1: the server may box-reduce a large picture before its resize, extraction does not
        assert top["id"] == str(path.relative_to(stamps)) and top["score"] > 0.99
        assert top["metadata"]["label"] == path.parent.name and len(body["matches"]) == 5
        assert base64.b64decode(top["thumbnail"].split(",", 1)[1])[:3] == b"\xff\xd8\xff"  # a JPEG
        assert body["pca"]["grid"] == [4, 4] and body["pca_error"] is None and body["classification"] is None
        assert rgb_array(body["pca"]).any()
    card = httpx.get(server.url + "/v1/card").json()
    assert card["index"]["count"] >= 36 and card["model"]["patch_tokens"] is True


def test_bad_input_gets_a_4xx_with_a_reason(server: BackgroundServer, stamps: Path) -> None:
    r = _query(server.url, b"plain text, not a picture")
    assert r.status_code == 422 and "not a decodable image" in r.json()["error"]["message"]
    r = _query(server.url, png_header(20_000, 20_000))  # a decompression bomb's header
    assert r.status_code == 413 and "pixel" in r.json()["error"]["message"]
    r = _query(server.url, b"x" * 2_100_000)
    assert r.status_code == 413
    one = next(stamps.rglob("*.png")).read_bytes()
    r = _query(server.url, one, top_k="0")
    assert r.status_code == 422 and "top_k" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/query", data={"top_k": "3"}, files={"other": ("a", b"")})
    assert r.status_code == 422
    pca = httpx.post(server.url + "/v1/pca", files=[("file", ("a.png", one)), ("file", ("b.png", one))]).json()
    first, second = (rgb_array(item) for item in pca["data"])
    np.testing.assert_array_equal(first, second)  # joint PCA: the same image gets the same colours


def test_empty_index_and_a_model_without_patch_tokens_are_explained(tiny_artifact: Path, stamps: Path,
                                                                    tmp_path: Path) -> None:
    one = next(stamps.rglob("*.png")).read_bytes()
    with BackgroundServer(ServeSettings(port=0, model=tiny_artifact, index_dir=tmp_path / "empty")) as srv:
        r = _query(srv.url, one)
        assert r.status_code == 404 and "index" in r.json()["error"]["message"] and "empty" in \
            r.json()["error"]["message"]
    export, index = onnx_index_without_patch_tokens(tiny_artifact, stamps / "food", tmp_path)
    with BackgroundServer(ServeSettings(port=0, model=export, index_dir=index)) as srv:
        body = _query(srv.url, (stamps / "food" / sorted(p.name for p in (stamps / "food").iterdir())[0])
                      .read_bytes()).json()
        assert body["matches"][0]["score"] > 0.99 and body["pca"] is None
        assert "no patch tokens" in body["pca_error"]
        r = httpx.post(srv.url + "/v1/pca", files={"file": ("a.png", one)})
        assert r.status_code == 422 and "--patch-tokens" in r.json()["error"]["message"]


def test_index_build_refuses_bad_input_with_a_message(tiny_artifact: Path, built: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cli_main(["index", "build", "--model", str(tiny_artifact), "--input", str(tmp_path / "empty"),
                     "--index", str(tmp_path / "i1"), "--no-progress"]) == 2
    assert "no images" in capsys.readouterr().err
    other = tmp_path / "other"
    assert cli_main(["init", "test", "--out", str(other), "--seed", "1"]) == 0
    assert cli_main(["index", "build", "--model", str(other), "--input", str(built), "--index",
                     str(built), "--no-progress"]) == 2
    assert "model_sha256" in capsys.readouterr().err  # an index of another model: refused before any work
    assert cli_main(["index", "build", "--model", str(tmp_path / "missing"), "--input", str(built),
                     "--index", str(tmp_path / "i2"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
