"""The SLURM example (``docs/slurm/dinoforge.sbatch``) builds a torchrun line that torch and dinoforge accept.

There is no SLURM cluster here, so this is not a SLURM run: ``scontrol`` and ``srun`` are replaced by two
stand-ins on ``PATH`` (``scontrol`` lists two hosts, ``srun`` records the command it was given). What is real:
the script under bash, torch's own torchrun parser and launch config, and dinoforge's CLI resolving the stage's
arguments. The two-agent runs of ``test_multinode.py`` run the same torchrun flags for real.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dinoforge.core.cli import main
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "docs" / "slurm" / "dinoforge.sbatch"
SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "4"}


def _stand_ins(folder: Path) -> Path:
    folder.mkdir()
    scripts = {"scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n',
               "srun": f'#!{sys.executable}\nimport json, os, sys\n'
                       'open(os.environ["SRUN_LOG"], "w").write(json.dumps(sys.argv[1:]))\n'}
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def _run_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = _stand_ins(tmp_path / "bin")
    log = tmp_path / "srun.json"
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(log)}
    done = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=60,
                          check=False)
    return done, json.loads(log.read_text()) if log.exists() else []


def test_the_script_builds_a_torchrun_line_torch_and_dinoforge_accept(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from torch.distributed.run import config_from_args, get_args_parser

    stage = ["pretrain", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "train.max_steps=2"]
    done, srun = _run_script(tmp_path, *stage, **SLURM_ENV)
    assert done.returncode == 0, done.stderr
    assert srun[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun"]
    args = get_args_parser().parse_args(srun[3:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == \
        ("2", "4", "c10d", "gpu07:29500", "4242")
    assert args.module and args.training_script == "dinoforge.core.cli" and args.training_script_args == stage
    config, _, _ = config_from_args(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.max_restarts) == (2, 2, 4, 0)
    assert main([*args.training_script_args, "--print-config"]) == 0  # the stage's own parser and recipe check
    assert "max_steps: 2" in capsys.readouterr().out


def test_the_knobs_change_the_line(tmp_path: Path) -> None:
    done, srun = _run_script(tmp_path, "extract", "--model", "M", **SLURM_ENV, NPROC_PER_NODE="2", RDZV_PORT="29611",
                             TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    assert done.returncode == 0, done.stderr
    assert srun[2:6] == [sys.executable, "-m", "torch.distributed.run", "--nnodes"]
    assert "--rdzv-endpoint" in srun and srun[srun.index("--rdzv-endpoint") + 1] == "gpu07:29611"
    assert srun[srun.index("--nproc-per-node") + 1] == "2" and srun[-3:] == ["extract", "--model", "M"]


def test_outside_slurm_or_without_a_stage_it_stops_with_a_message(tmp_path: Path) -> None:
    done, srun = _run_script(tmp_path, **SLURM_ENV)
    assert done.returncode == 2 and "usage: sbatch" in done.stderr and srun == []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(SCRIPT), "pretrain"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0 and "run this script with sbatch" in done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_finds_nothing() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout
