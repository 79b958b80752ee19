"""`dinoforge embed` against bad files, a busy server and interruptions: per-path errors, --skip-bad with a
report, resumable output, jittered backoff that honours Retry-After, atomic writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dinoforge.core.cli import main as cli_main
from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.client import ClientError, DinoforgeClient
from dinoforge.serve.server import BackgroundServer
from dinoforge.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeSettings(port=0), backend=FakeBackend()) as srv:
        yield srv


@pytest.fixture()
def folder(tmp_path: Path, sample_files: list[Path]) -> Path:
    """12 real images; the 12th in sorted order (index 11) is a corrupt PNG."""
    root = tmp_path / "images"
    root.mkdir()
    for i, f in enumerate(sample_files[:11]):
        shutil.copy(f, root / f"{i:02d}{f.suffix}")
    (root / "11_broken.png").write_bytes(sample_files[0].read_bytes()[:40])
    return root


def _embed(server: BackgroundServer, *args: str) -> int:
    return cli_main(["embed", *args, "--server", server.url, "--no-progress", "--batch-size", "4",
                     "--concurrency", "1"])


def _images_seen(server: BackgroundServer) -> float:
    return server.state.metrics.images._value.get()


def test_a_bad_file_is_named_by_its_path(server: BackgroundServer, folder: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _embed(server, str(folder), "--out", str(tmp_path / "v.npy")) == 2
    err = capsys.readouterr().err
    assert str(folder / "11_broken.png") in err and "input[" not in err
    assert not (tmp_path / "v.npy").exists()  # nothing half-written


def test_skip_bad_writes_the_rest_and_a_report(server: BackgroundServer, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.npy"
    assert _embed(server, str(folder), "--out", str(out), "--skip-bad") == 0
    vectors = np.load(out)
    ids = (tmp_path / "v.npy.ids.txt").read_text().splitlines()
    assert vectors.shape == (11, 16) and len(ids) == 11 and all("broken" not in i for i in ids)
    report = [json.loads(line) for line in (tmp_path / "v.npy.bad.jsonl").read_text().splitlines()]
    assert report[0]["path"] == str(folder / "11_broken.png") and report[0]["status"] == 422
    assert "decodable" in report[0]["reason"]
    assert not (tmp_path / "v.npy.partial.jsonl").exists()
    with DinoforgeClient(server.url) as client:  # same vectors as one direct call
        np.testing.assert_allclose(vectors, client.embed(sorted(folder.glob("0*")) + sorted(folder.glob("10*"))).vectors,
                                   atol=1e-6)


def test_an_interrupted_run_resumes_without_redoing_finished_batches(server: BackgroundServer, folder: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    assert _embed(server, str(folder), "--out", str(out)) == 2  # stops at the bad file, batches 1-2 are journaled
    journal = tmp_path / "v.jsonl.partial.jsonl"
    assert len(journal.read_text().splitlines()) == 1 + 8
    with open(journal, "a") as handle:
        handle.write('{"id": "torn')  # a crash mid-write leaves a torn line
    (folder / "11_broken.png").unlink()
    before = _images_seen(server)
    assert _embed(server, str(folder), "--out", str(out)) == 0
    assert _images_seen(server) - before == 3  # only the last batch was sent again
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert not journal.exists()


def test_a_journal_of_other_options_is_refused(server: BackgroundServer, folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.npy"
    assert _embed(server, str(folder), "--out", str(out)) == 2
    assert _embed(server, str(folder), "--out", str(out), "--dimensions", "4") == 2
    assert "other options" in capsys.readouterr().err


def test_backoff_is_jittered_and_honours_retry_after() -> None:
    with DinoforgeClient("http://127.0.0.1:9") as client:
        told = [client._wait_s(ClientError("busy", status=429, retry_after=2.0), 0) for _ in range(50)]
        free = [client._wait_s(ClientError("busy", status=503), 3) for _ in range(50)]
    assert all(2.0 <= w <= 3.0 for w in told) and len(set(told)) > 40  # never early, spread out
    assert all(0.1 <= w <= 4.0 for w in free) and len(set(free)) > 40


def test_embed_survives_a_saturated_server(tmp_path: Path, sample_files: list[Path]) -> None:
    settings = ServeSettings(port=0, max_queue_size=4, max_images_per_request=4, max_batch_size=4)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        shutil.copy(sample_files[i % len(sample_files)], root / f"{i:03d}{sample_files[i % len(sample_files)].suffix}")
    with BackgroundServer(settings, backend=FakeBackend(delay_s=0.02)) as srv:
        code = cli_main(["embed", str(root), "--server", srv.url, "--no-progress", "--batch-size", "4",
                         "--concurrency", "8", "--out", str(tmp_path / "v.npy")])
        rejected = srv.state.metrics.rejected.labels(reason="queue_full")._value.get()
    assert code == 0 and np.load(tmp_path / "v.npy").shape == (40, 16)
    assert rejected > 0  # the server did refuse batches with 429; the client waited and retried them
