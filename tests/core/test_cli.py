"""The console script: fast help, clear errors with exit 2, info/convert/init/parity end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoforge.core.backbone import build_backbone
from dinoforge.core.backbone.convert import dinoforge_to_official
from tests.helpers import run_cli as run


def test_help_lists_commands_without_importing_torch() -> None:
    code = ("import sys; from dinoforge.core.cli import build_parser; p = build_parser(); "
            "print('torch' in sys.modules, p.format_help())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")
    for command in ("info", "convert", "init", "parity", "eval", "pretrain", "export", "serve"):
        assert command in out


@pytest.mark.slow  # three CLI processes, ~20 s of CPU
def test_convert_official_then_info(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pth = tmp_path / "dinov2_vits14_like.pth"
    torch.save(dinoforge_to_official(build_backbone("test_reg4").state_dict()), pth)
    res = run("convert", str(pth), "--out", str(tmp_path / "art"), "--num-heads", "2")
    assert res.returncode == 0, res.stderr
    info = run("info", str(tmp_path / "art"))
    assert info.returncode == 0 and "registers=4" in info.stdout and "official-checkpoint" in info.stdout
    again = run("convert", str(pth), "--out", str(tmp_path / "art"))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow  # four CLI processes, ~25 s of CPU
def test_bad_inputs_exit_2_with_a_message(tmp_path: Path) -> None:
    truncated = tmp_path / "t.pth"
    torch.save(build_backbone("test").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    cases = [
        (("convert", str(truncated), "--out", str(tmp_path / "o")), "truncated"),
        (("info", str(tmp_path / "missing_dir")), "does not exist"),
        (("init", "test", "--out", str(tmp_path / "i"), "--set", "depht=3"), "unknown key 'depht'"),
        (("parity", str(tmp_path / "nothing_here")), "does not exist"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not (tmp_path / "o").exists()


def test_artifact_with_missing_file_is_reported(tmp_path: Path) -> None:
    assert run("init", "test", "--out", str(tmp_path / "a")).returncode == 0
    (tmp_path / "a" / "model.safetensors").unlink()
    res = run("eval", "knn", "--model", str(tmp_path / "a"), "--train", "fmnist:train", "--test", "fmnist:test")
    assert res.returncode == 2 and "model.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_parity_on_backbone_fixtures_and_on_a_perturbed_copy(fixtures_dir: Path, tmp_path: Path) -> None:
    for name in ("backbone_official_noreg.pt", "backbone_official_reg4.pt"):
        shutil.copy(fixtures_dir / name, tmp_path / name)
    res = run("parity", str(tmp_path), "--json", str(tmp_path / "report.json"))
    assert res.returncode == 0, res.stdout[-2000:]
    assert "0 failed" in res.stdout and (tmp_path / "report.json").is_file()

    fx = torch.load(tmp_path / "backbone_official_reg4.pt", weights_only=True)
    fx["res2/x_norm_patchtokens"] = fx["res2/x_norm_patchtokens"] + 1e-3
    torch.save(fx, tmp_path / "backbone_official_reg4.pt")
    res = run("parity", str(tmp_path), "--failures-only")
    assert res.returncode == 1
    assert "res2/x_norm_patchtokens" in res.stdout and "1 failed" in res.stdout
