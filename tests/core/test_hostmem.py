"""glibc's mmap threshold: with the fixed threshold, freed large buffers leave the process; by default they stay."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dinoforge.core.errors import ConfigError
from dinoforge.core.hostmem import set_mmap_threshold
from dinoforge.pretrain.config import load_pretrain_config

# 150 buffers of 2 MiB interleaved with small kept ones (so heap holes cannot be trimmed from the top), after
# one 8 MiB buffer was freed (which raises glibc's dynamic threshold above 2 MiB, as a sharded step does).
PROBE = textwrap.dedent("""
    import sys, torch
    from dinoforge.core.hostmem import set_mmap_threshold
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "fixed":
        assert set_mmap_threshold(1.0)
    torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1)
    before = rss_mb()
    big, small = [], []
    for _ in range(150):
        big.append(torch.ones(2 * 2**20, dtype=torch.uint8))
        small.append(torch.ones(32 * 1024, dtype=torch.uint8))
    del big
    print(rss_mb() - before)
""")


def _kept_mb(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is a Linux matter")
def test_fixed_threshold_returns_freed_buffers() -> None:
    default, fixed = _kept_mb("default"), _kept_mb("fixed")
    assert fixed < 30, f"{fixed:.0f} MB of 300 MB freed buffers still resident with the fixed threshold"
    assert default > fixed + 200, f"default kept {default:.0f} MB, fixed {fixed:.0f} MB"


def test_none_leaves_glibc_alone_and_config_bounds() -> None:
    assert set_mmap_threshold(None) is False
    assert load_pretrain_config("tiny", ["run_dir=unused"]).train.host_mmap_threshold_mib is None
    assert load_pretrain_config("vitl14", ["run_dir=unused"]).train.host_mmap_threshold_mib == 4.0
    with pytest.raises(ConfigError):
        load_pretrain_config("tiny", ["run_dir=unused", "train.host_mmap_threshold_mib=64"])  # glibc's cap is 32
