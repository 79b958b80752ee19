"""Files written by every stage follow the process umask (a Triton server or another user must read them)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinoforge.core.fileio import atomic_directory, atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture()
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_files_and_folders_follow_the_umask(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "weights.bin", b"\x00" * 8)
    atomic_write_json(tmp_path / "card.json", {"a": 1})
    with atomic_directory(tmp_path / "repo") as staging:
        (staging / "config.pbtxt").write_text("name: 'm'")
        atomic_write_bytes(staging / "1" / "model.onnx", b"onnx")
    assert _mode(tmp_path / "weights.bin") == 0o666 & ~mask  # was 0600 whatever the umask
    assert _mode(tmp_path / "card.json") == 0o666 & ~mask
    assert _mode(tmp_path / "repo") == 0o777 & ~mask  # was 0700
    assert _mode(tmp_path / "repo" / "1" / "model.onnx") == 0o666 & ~mask


def test_replacing_keeps_following_the_umask(tmp_path: Path, umask: None) -> None:
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "x", b"1")
    os.umask(0o022)
    atomic_write_bytes(tmp_path / "x", b"2")
    assert _mode(tmp_path / "x") == 0o644 and (tmp_path / "x").read_bytes() == b"2"
