"""Shards through fsspec (local files, file:// and a local HTTP server) and the shard-stream order with resume."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from dinoforge.core.data import BadSample, WebDatasetSource, open_source
from dinoforge.core.data.stream import ShardStreams, StreamCursor, choose_streams, write_shard_counts
from dinoforge.core.errors import DataError
from tests.core.test_data_webdataset import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoded(source: WebDatasetSource) -> list[tuple[str, int | None, bytes]]:
    return [(s.id, s.label, np.asarray(s.image).tobytes()) for s in source]


def test_http_and_file_urls_read_like_local_paths(sample_images_dir: Path, http_root: tuple[Path, str]) -> None:
    root, url = http_root
    write_shards(sample_images_dir, root, n_shards=3, per_shard=4)
    (root / "classes.txt").write_text("zero\none\n")
    local = WebDatasetSource(f"{root}/shard-{{000..002}}.tar")
    remote = open_source(f"wds:{url}/shard-{{000..002}}.tar")
    assert isinstance(remote, WebDatasetSource) and remote.classes == local.classes == ["zero", "one"]
    expected = _decoded(local)
    assert len(expected) == 12 and _decoded(remote) == expected
    assert _decoded(WebDatasetSource(f"file://{root}/shard-{{000..002}}.tar")) == expected
    assert [s.name for s in remote.shards] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    missing = list(WebDatasetSource(f"{url}/shard-{{002..003}}.tar"))  # the server answers 404 for the second
    assert len(missing) == 5 and isinstance(missing[-1], BadSample) and "unreachable" in missing[-1].reason


def _keys(streams: ShardStreams, cursors: dict[int, StreamCursor], positions: np.ndarray) -> list[str]:
    """Shard/key of each global position, read through (and advancing) one process's cursors."""
    out = []
    for v, q in zip(*streams.locate(positions), strict=True):
        cursor = cursors.setdefault(int(v), StreamCursor(streams, int(v)))
        url, key, _ = cursor.item(int(q))
        out.append(f"{url.rsplit('/', 1)[1]}/{key}")
    return out


@pytest.mark.parametrize("counted", [False, True])
def test_resume_with_another_world_size_reads_the_epoch_once(sample_images_dir: Path, tmp_path: Path,
                                                             counted: bool) -> None:
    """2 ranks for 2 steps, then 1 rank (a new process) from step 2: each of the 24 samples exactly once."""
    expected = write_shards(sample_images_dir, tmp_path, n_shards=4, per_shard=6)
    source = WebDatasetSource(f"{tmp_path}/shard-{{000..003}}.tar")
    if counted:
        assert write_shard_counts(source) == {f"shard-{s:03d}.tar": 6 for s in range(4)}
    streams = ShardStreams(source, seed=3, global_batch=8)
    assert (streams.n_streams, streams.per_step) == (4, 2) and (streams.counts is not None) == counted
    seen = []
    rank_cursors: list[dict[int, StreamCursor]] = [{}, {}]
    for step in range(2):
        for rank in range(2):
            seen += _keys(streams, rank_cursors[rank], np.arange(step * 8 + rank * 4, step * 8 + rank * 4 + 4))
    seen += _keys(ShardStreams(source, seed=3, global_batch=8), {}, np.arange(16, 24))
    assert sorted(seen) == sorted(e[0] for e in expected)
    one_process = _keys(streams, {}, np.arange(0, 24))
    assert seen == one_process  # the same samples at the same positions as an uninterrupted single process
    next_epoch = _keys(streams, {}, np.arange(24, 48))
    assert sorted(next_epoch) == sorted(seen) and next_epoch != seen  # epoch 1: new shard order


def test_stream_choice_and_errors(sample_images_dir: Path, tmp_path: Path) -> None:
    assert choose_streams(1024, 5000) == 1024 and choose_streams(12, 5) == 4 and choose_streams(7, 3) == 1
    write_shards(sample_images_dir, tmp_path, n_shards=3, per_shard=2)
    source = WebDatasetSource(f"{tmp_path}/shard-{{000..002}}.tar")
    with pytest.raises(DataError, match="must divide the global batch"):
        ShardStreams(source, seed=0, global_batch=8, n_streams=3)
    with pytest.raises(DataError, match="at most the number of shards"):
        ShardStreams(source, seed=0, global_batch=8, n_streams=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    tarfile.open(empty / "e.tar", "w").close()
    with pytest.raises(DataError, match="holds no samples"):
        StreamCursor(ShardStreams(WebDatasetSource(str(empty / "e.tar")), seed=0, global_batch=2), 0).item(0)
