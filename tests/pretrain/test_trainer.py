"""End-to-end pretraining runs through the real CLI: outputs, artifact, monitoring, bad input, spikes, high-res."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from dinoforge.core.artifact import load_artifact
from dinoforge.core.backbone.pos_embed import resample_pos_embed_param
from dinoforge.core.cli import main as cli_main
from dinoforge.pretrain.checkpointing import checkpoint_path, list_checkpoints, load_checkpoint
from dinoforge.pretrain.config import PretrainConfig, load_pretrain_config
from dinoforge.pretrain.monitor import collapse_indicators, collapse_warning, read_metrics
from dinoforge.pretrain.pretrain_run import pretrain_trainer
from dinoforge.pretrain.spikes import SpikeConfig, SpikeDetector, TrainingDivergedError
from tests.helpers import run_cli

FAST = ["train.threads=1", "train.max_steps=6", "checkpoint.every_steps=3", "monitor.log_every=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    done = run_cli("pretrain", "--config", "tiny", f"run_dir={run_dir}", *FAST, "monitor.tensorboard=true",
                "knn.every_steps=3", "knn.at_end=true", "knn.train=fmnist:train[:300]", "knn.test=fmnist:test[:200]",
                "knn.k=10")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher artifact" in done.stdout
    return run_dir


def test_run_directory_outputs(tiny_run: Path) -> None:
    resolved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert PretrainConfig.model_validate(resolved) == load_pretrain_config(tiny_run / "config.yaml")
    assert resolved["run_dir"] == str(tiny_run)
    assert [s for s, _ in list_checkpoints(tiny_run / "checkpoints")] == [3, 6]
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    records = read_metrics(tiny_run)
    train = [r for r in records if "total_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for rec in train:
        for key in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr", "dino_local_crops_loss",
                    "dino_global_crops_loss", "koleo_loss", "ibot_loss", "img_per_s", "teacher_entropy",
                    "teacher_batch_entropy", "feature_std", "center_norm", "grad_norm_backbone"):
            assert math.isfinite(rec[key]), key
        assert 0 <= rec["teacher_entropy"] <= 1 and 0 <= rec["teacher_batch_entropy"] <= 1
    assert train[0]["last_layer_lr"] == 0.0  # last layer frozen during the first epoch (4 steps)
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [3, 6] and all(0 <= r["knn_top1"] <= 100 for r in knn)


def test_teacher_artifact_with_provenance(tiny_run: Path) -> None:
    art = load_artifact(tiny_run / "artifact")
    prov = art.card.provenance
    assert prov.source == "pretrain" and prov.details["step"] == 6
    assert prov.data_manifest_sha256 and len(prov.data_manifest_sha256) == 64
    assert "knn_top1" in prov.metrics and yaml.safe_load(prov.recipe)["model"]["backbone"]["patch_size"] == 7
    assert set(art.heads) == {"dino_head"}
    assert art.card.preprocessing.size == 28 and art.card.preprocessing.mode == "resize"
    final = load_checkpoint(checkpoint_path(tiny_run / "checkpoints", 6))
    for name, value in art.backbone.state_dict().items():
        assert torch.equal(value, final["teacher"][f"backbone.{name}"]), name
    feats = art.backbone.forward_features(torch.randn(2, 3, 28, 28))
    assert feats.shape == (2, 17, 32)


def test_plot_writes_pngs(tiny_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    assert cli_main(["plot", str(tiny_run), "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["collapse.png", "knn.png", "losses.png", "schedules.png", "throughput.png"]
    with Image.open(tmp_path / "losses.png") as img:
        assert img.format == "PNG" and img.width > 400


def test_rerun_of_a_finished_run_changes_nothing(tiny_run: Path) -> None:
    before = load_checkpoint(checkpoint_path(tiny_run / "checkpoints", 6))["student"]
    cfg = load_pretrain_config(tiny_run / "config.yaml", [*FAST, "knn.at_end=false", "knn.every_steps=null",
                                                          "monitor.tensorboard=false"])
    result = pretrain_trainer(cfg).run()
    assert result.steps == 6 and not result.stopped_early
    after = load_checkpoint(checkpoint_path(tiny_run / "checkpoints", 6))["student"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("args", "message"), [
    (["model.backbone.embed_dimm=3"], "unknown key 'model.backbone.embed_dimm'"),
    (["data.source=folder:/nonexistent/images"], "does not exist"),
    (["crops.local_crops_size=15"], "not a multiple of the patch size"),
    (["train.device=cuda:0"], "no CUDA GPU"),
    (["parallel.strategy=ddp"], "needs torchrun"),
])
def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    status = cli_main(["pretrain", "--config", "tiny", f"run_dir={tmp_path / 'r'}", *args])
    assert status == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoints_and_changed_recipe_are_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint_path(run / "checkpoints", 2).write_bytes(b"DINOFORGE-CKPT 1 00 5\nxxxxx")
    assert cli_main(["pretrain", "--config", "tiny", f"run_dir={run}"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    good = tmp_path / "g"
    assert cli_main(["pretrain", "--config", "tiny", f"run_dir={good}", *FAST[:2], "train.max_steps=2",
                     "knn.at_end=false"]) == 0
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", "tiny", f"run_dir={good}", "model.backbone.depth=3"]) == 2
    assert "'model' changed" in capsys.readouterr().err
    assert cli_main(["pretrain", "--config", "tiny", f"run_dir={tmp_path / 'w'}",
                     f"init.from_checkpoint={good}", "model.backbone.embed_dim=48"]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_high_resolution_adaptation(tmp_path: Path) -> None:
    """Warm start at 42 px from a 28 px run: position embedding resampled, fresh schedule, trains."""
    low = tmp_path / "low"
    pretrain_trainer(load_pretrain_config("tiny", [f"run_dir={low}", *FAST[:1], "train.max_steps=2"])).run()
    old = load_checkpoint(list_checkpoints(low / "checkpoints")[-1][1])
    cfg = load_pretrain_config("tiny", [f"run_dir={tmp_path / 'high'}", *FAST[:1], "train.max_steps=2",
                                        f"init.from_checkpoint={low}", "crops.global_crops_size=42",
                                        "crops.local_crops_size=21", "model.backbone.img_size=42",
                                        "schedule.epochs=1", "schedule.warmup_epochs=0"])
    trainer = pretrain_trainer(cfg)
    for tree in ("student", "teacher"):
        expect = resample_pos_embed_param(old[tree]["backbone.pos_embed"], 6, offset=0.1, antialias=False)
        got = getattr(trainer.parts.model, tree)["backbone"].pos_embed.detach()
        assert got.shape == (1, 37, 32) and torch.equal(got, expect)
        assert torch.equal(getattr(trainer.parts.model, tree)["backbone"].blocks[0].attn.qkv.weight.detach(),
                           old[tree]["backbone.blocks.0.attn.qkv.weight"])
    result = trainer.run()
    assert result.steps == 2
    rec = [r for r in read_metrics(tmp_path / "high") if "total_loss" in r][-1]
    assert math.isfinite(rec["total_loss"])


def test_spike_detector_rules() -> None:
    det = SpikeDetector(SpikeConfig(policy="skip", factor=2.0, window=5, min_history=3, max_consecutive=3))
    assert not any(det.is_spike(v) for v in (10.0, 9.0, 11.0))
    assert det.is_spike(25.0) and det.is_spike(float("nan"))  # 25 > 2 * median(10); NaN always
    assert not det.is_spike(12.0) and det.consecutive == 0 and det.total == 2
    with pytest.raises(TrainingDivergedError, match="consecutive loss spikes"):
        for _ in range(3):
            det.is_spike(float("inf"))
    state = det.state_dict()
    other = SpikeDetector(det.cfg)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert not SpikeDetector(SpikeConfig(policy="off")).is_spike(float("nan"))


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_spike_policies_in_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """A spike reported at step 6: ``skip`` drops that update, ``rollback`` returns to the step-4 checkpoint."""
    real = SpikeDetector.is_spike
    calls = {"n": 0}

    def spike_at_six(self: SpikeDetector, loss: float) -> bool:  # fault injection on top of the real detector
        calls["n"] += 1
        return True if calls["n"] == 6 else real(self, loss)

    monkeypatch.setattr(SpikeDetector, "is_spike", spike_at_six)
    cfg = load_pretrain_config("tiny", [f"run_dir={tmp_path / policy}", *FAST[:1], "train.max_steps=8",
                                        "checkpoint.every_steps=2", "monitor.log_every=1", f"spike.policy={policy}",
                                        "knn.at_end=false"])
    result = pretrain_trainer(cfg).run()
    assert result.steps == 8
    final = load_checkpoint(checkpoint_path(tmp_path / policy / "checkpoints", 8))["progress"]
    if policy == "skip":
        assert final["skipped_steps"] == 1 and final["images_seen"] == 7 * 8 and final["data_offset"] == 0
    else:
        # spike on data step 5 (the 6th batch): back to step 4, then continue with data step 6
        assert final["rollbacks"] == 1 and final["data_offset"] == 2 and final["images_seen"] == 8 * 8
        assert calls["n"] == 6 + 4  # steps 5-8 redone after the rollback


def test_collapse_indicators_and_warning() -> None:
    g = torch.Generator().manual_seed(0)
    healthy = collapse_indicators(torch.randn(64, 100, generator=g) * 5, torch.randn(64, 32, generator=g),
                                  teacher_temp=0.07)
    assert healthy["feature_std"] > 0.8 and healthy["teacher_batch_entropy"] > 0.5
    assert collapse_warning(healthy, min_feature_std=0.05, max_entropy=0.995) is None
    same = torch.randn(1, 32, generator=g).expand(64, -1)
    collapsed = collapse_indicators(torch.randn(1, 100, generator=g).expand(64, -1) * 5, same, teacher_temp=0.07)
    assert collapsed["feature_std"] < 1e-3 and collapsed["teacher_batch_entropy"] < 0.3
    assert "collapsed" in collapse_warning(collapsed, min_feature_std=0.05, max_entropy=0.995)
    uniform = collapse_indicators(torch.zeros(64, 100), torch.randn(64, 32, generator=g), teacher_temp=0.07)
    assert uniform["teacher_entropy"] == pytest.approx(1.0)
    assert "uniform" in collapse_warning(uniform, min_feature_std=0.05, max_entropy=0.995)


def _final_student(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(run_dir / "checkpoints", step))["student"]


def test_activation_checkpointing_changes_nothing_and_mixed_precision_trains(tmp_path: Path) -> None:
    common = [*FAST[:1], "train.max_steps=3", "checkpoint.every_steps=3", "knn.at_end=false",
              "model.backbone.drop_path_rate=0.2"]
    runs = {}
    for name, extra in {"plain": [], "ac": ["parallel.activation_checkpointing=true"],
                        "bf16": ["train.precision=bf16"], "fp16": ["train.precision=fp16"]}.items():
        pretrain_trainer(load_pretrain_config("tiny", [f"run_dir={tmp_path / name}", *common, *extra])).run()
        runs[name] = _final_student(tmp_path / name, 3)
    for key, value in runs["plain"].items():  # recomputation replays the same ops and the same RNG draws
        assert torch.equal(value, runs["ac"][key]), key
    for name in ("bf16", "fp16"):
        rec = [r for r in read_metrics(tmp_path / name) if "total_loss" in r][-1]
        assert math.isfinite(rec["total_loss"])
        moved = max(float((runs[name][k] - runs["plain"][k]).abs().max()) for k in runs["plain"])
        assert 0 < moved < 0.05  # trained, and close to the fp32 run after 3 steps
    assert load_checkpoint(checkpoint_path(tmp_path / "fp16" / "checkpoints", 3))["scaler"]["scale"] > 0


def test_time_budget_stops_with_a_checkpoint(tmp_path: Path) -> None:
    cfg = load_pretrain_config("tiny", [f"run_dir={tmp_path}", *FAST[:1], "train.max_minutes=0.0001",
                                        "knn.at_end=false"])
    result = pretrain_trainer(cfg).run()
    assert result.stopped_early and result.steps == 1
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert (tmp_path / "artifact" / "model.json").is_file()
