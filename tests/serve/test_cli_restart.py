"""Index persistence across restarts (a real `dinoforge serve` process killed with SIGKILL, and a graceful
in-process restart), `dinoforge embed` against a server, API keys, and CLI errors (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from dinoforge.core.artifact import read_card as load_card
from dinoforge.core.cli import main as cli_main
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings
from tests.serve.helpers import ServeProcess, b64

KEY = "test-key-123"


def _search(url: str, image: bytes, k: int = 3) -> list[dict]:
    r = httpx.post(url + "/v1/search", json={"input": b64(image), "top_k": k},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["matches"]


def _add(url: str, images: list[bytes], start: int) -> None:
    items = [{"id": f"id{start + i}", "image": b64(b), "metadata": {"i": start + i}} for i, b in enumerate(images)]
    r = httpx.post(url + "/v1/index", json={"items": items}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.integration  # `dinoforge serve` in its own process, killed and restarted
def test_index_survives_sigkill_after_acknowledged_writes(tiny_artifact: Path, tmp_path: Path,
                                                          sample_bytes: list[bytes]) -> None:
    args = ["--model", str(tiny_artifact), "--index-dir", str(tmp_path / "index"), "--threads", "1"]
    env = {"DINOFORGE_API_KEYS": KEY}
    with ServeProcess(args, env=env) as server:
        _add(server.url, sample_bytes[:10], 0)
        before = _search(server.url, sample_bytes[3])
        assert before[0]["id"] == "id3"
        r = httpx.delete(server.url + "/v1/index/id0", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        _add(server.url, sample_bytes[10:15], 10)
        server.kill()  # SIGKILL right after acknowledged writes: no shutdown code runs
    with ServeProcess(args, env=env) as server:
        info = httpx.get(server.url + "/v1/index", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert info["count"] == 14
        assert _search(server.url, sample_bytes[3]) == before
        assert _search(server.url, sample_bytes[12])[0]["id"] == "id12"
        assert all(m["id"] != "id0" for m in _search(server.url, sample_bytes[0], k=14))
        # SIGTERM: uvicorn runs the lifespan shutdown, then re-raises the signal
        assert server.terminate() in (0, -15)


def test_index_survives_a_graceful_restart(tiny_artifact: Path, tmp_path: Path, sample_bytes: list[bytes]) -> None:
    settings = ServeSettings(port=0, model=tiny_artifact, index_dir=tmp_path / "index", api_keys=[KEY])
    with BackgroundServer(settings) as server:
        _add(server.url, sample_bytes[20:28], 0)
        before = _search(server.url, sample_bytes[25])
    snapshot = json.loads((tmp_path / "index" / "index.json").read_text())
    assert snapshot["count"] == 8  # written on shutdown / after the change
    with BackgroundServer(settings) as server:
        assert _search(server.url, sample_bytes[25]) == before
        assert before[0]["id"] == "id5"
    other = tmp_path / "other_model"
    shutil.copytree(tiny_artifact, other)
    card = json.loads((other / "model.json").read_text())
    card["weights_sha256"] = "0" * 64  # a different model must not reuse this index
    (other / "model.json").write_text(json.dumps(card))
    with pytest.raises(Exception, match="index .* was built with"):
        from dinoforge.serve.backends.torch_backend import info_from_card
        from dinoforge.serve.index_store import IndexStore
        from dinoforge.core.pooling import pooled_dim

        info = info_from_card(load_card(other))
        IndexStore(tmp_path / "index", dim=pooled_dim(info.embed_dim, "cls"), pooling="cls",
                   model_sha256=info.weights_sha256)


def test_dinoforge_embed_against_a_server(tiny_artifact: Path, tmp_path: Path, sample_images_dir: Path,
                                          sample_files: list[Path], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServeSettings(port=0, model=tiny_artifact, api_keys=[KEY])
    with BackgroundServer(settings) as server:
        out = tmp_path / "emb.npy"
        monkeypatch.setenv("DINOFORGE_API_KEY", KEY)
        assert cli_main(["embed", str(sample_images_dir), "--server", server.url, "--out", str(out),
                         "--batch-size", "16", "--no-progress"]) == 0
        vectors = np.load(out)
        names = (tmp_path / "emb.npy.ids.txt").read_text().splitlines()
        assert vectors.shape == (100, 64) and names == [str(p) for p in sample_files]
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        monkeypatch.delenv("DINOFORGE_API_KEY")
        capsys.readouterr()
        assert cli_main(["embed", str(sample_files[5]), "--server", server.url, "--no-progress",
                         "--api-key", KEY, "--pooling", "cls"]) == 0
        line = json.loads(capsys.readouterr().out.strip())
        assert line["id"] == str(sample_files[5])
        np.testing.assert_allclose(line["embedding"], vectors[5], atol=1e-5)
        assert cli_main(["embed", str(sample_files[0]), "--server", server.url, "--api-key", "nope"]) == 2
        err = capsys.readouterr().err
        assert "401" in err and "invalid API key" in err and "Traceback" not in err


def test_cli_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty").mkdir()
    cases = [
        (["serve", "--model", str(tmp_path / "missing")], "does not exist"),
        (["serve"], "needs --model"),
        (["serve", "--model", str(tmp_path), "--max-batch-size", "0"], "max_batch_size"),
        (["serve", "--model", str(tmp_path)], "cannot tell which backend"),
        (["serve", "--model", str(tmp_path), "--backend", "tensorrt"], "TensorRT"),
        (["embed", str(tmp_path / "nothing.png"), "--server", "http://127.0.0.1:9"], "does not exist"),
        (["embed", str(tmp_path / "empty"), "--server", "http://127.0.0.1:9"], "holds no images"),
        (["embed", str(tmp_path / "a.png"), "--server", "http://127.0.0.1:9"], "cannot reach"),
        (["embed", str(tmp_path / "a.png"), "--out", str(tmp_path / "x.csv")], ".npy or .jsonl"),
        (["serve", "build-head", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "h")],
         "has no model.json"),
    ]
    for args, fragment in cases:
        status = cli_main(args)
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        assert f"dinoforge {args[0]}: error: " in err and fragment in err and "Traceback" not in err, (args, err)
