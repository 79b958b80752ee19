"""Meta-device construction + FSDP2 sharding + in-place shard init gives the ordinary build's weights, bit for bit.

Run as a script under torchrun it is the worker: it builds the sharded meta-architecture, gathers the full
state and writes it (with the generator state) for the test to compare with an ordinary build.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoforge.core.runtime import init_runtime, seed_everything, shutdown_runtime
from dinoforge.pretrain.config import load_pretrain_config
from dinoforge.pretrain.meta_arch import MetaArchConfig, SSLMetaArch, build_student, ema_teacher_from
from dinoforge.pretrain.meta_init import InitRecorder, MetaInitError, build_sharded_meta_arch, replay, targets_of
from dinoforge.pretrain.parallelize import ParallelConfig

# stochastic depth, a separate iBOT head, registers and SwiGLU (whose init writes half of fc1): every kind of
# parameter and init the recipes build
OVERRIDES = ["run_dir=unused", "model.backbone.drop_path_rate=0.2", "model.ibot_separate_head=true",
             "model.backbone.num_register_tokens=2", "model.backbone.ffn=swiglu"]


def _config() -> MetaArchConfig:
    return load_pretrain_config("tiny", OVERRIDES).model


def _ordinary(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    seed_everything(seed)
    meta = SSLMetaArch(_config())
    state = {f"{tree}.{k}": v for tree in ("student", "teacher") for k, v in getattr(meta, tree).state_dict().items()}
    return state, torch.get_rng_state()


def test_recorded_construction_replays_to_the_ordinary_weights() -> None:
    """No process group: the replay fills plain (unsharded) tensors, which must equal an ordinary build."""
    expected, expected_rng = _ordinary(3)
    seed_everything(3)
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        student = build_student(_config())
        teacher = ema_teacher_from(student, _config())
    trees = {"student": student, "teacher": teacher}
    targets = targets_of(trees)
    for tree in trees.values():
        tree.to_empty(device="cpu")
    replay(recorder.events, targets)
    got = {f"{name}.{k}": v for name, tree in trees.items() for k, v in tree.state_dict().items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(torch.get_rng_state(), expected_rng)  # later stochastic-depth draws match too


def test_unreplayable_construction_is_refused() -> None:
    class Computed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3) * 0.02)  # a value computed outside any in-place init

    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        module = Computed()
    targets = targets_of({"m": module})
    module.to_empty(device="cpu")
    with pytest.raises(MetaInitError, match="never written in place"):
        replay(recorder.events, targets)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_meta_init_equals_ordinary_build(tmp_path: Path) -> None:
    from tests.helpers import process_env  # here: the module also runs as a plain script (the worker)

    out = tmp_path / "sharded.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(out)]
    done = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    expected, expected_rng = _ordinary(0)
    assert got["state"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got["state"][key], value), key
    for rng in got["rng"]:
        assert torch.equal(rng, expected_rng)


def _worker(out: str) -> None:
    """torchrun worker: sharded meta build on gloo, full state gathered on rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    runtime = init_runtime("cpu", threads=1)
    seed_everything(0)
    meta, par = build_sharded_meta_arch(_config(), ParallelConfig(strategy="fsdp"), world_size=runtime.world_size,
                                        device=runtime.device)
    assert par.strategy == "fsdp"
    rngs: list = [None] * runtime.world_size
    dist.all_gather_object(rngs, torch.get_rng_state())
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {f"{tree}.{k}": v for tree in ("student", "teacher")
             for k, v in get_model_state_dict(getattr(meta, tree), options=full).items()}
    if runtime.is_main:
        torch.save({"state": state, "rng": rngs}, out)
    shutdown_runtime(runtime)


if __name__ == "__main__":
    _worker(sys.argv[1])
