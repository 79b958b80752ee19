"""``dinoforge parity`` on the official golden fixtures and on modified copies of them.

The copies change sizes only through transformations whose effect on every reference value follows exactly
from the README semantics, so the transformed references are still official numbers:

* **duplicating every image** (B -> 2B): centring means, Sinkhorn-Knopp targets (the fixed point of a batch
  and of its duplicate coincide) and every loss are unchanged; gradients w.r.t. the logits halve;
* **duplicating every prototype** (K -> 2K): targets halve, ``log_softmax`` drops by ``log 2``, so each pair
  cross-entropy grows by ``log 2`` and logit gradients halve.

Slicing rows would not do (Sinkhorn-Knopp and the centres depend on the whole batch). Perturbed copies must
fail, files of unknown layout must be reported, and malformed files must fail cleanly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoforge.core.cli import main
from dinoforge.core.parity import run_parity
from dinoforge.pretrain import train_loop
from dinoforge.pretrain.losses import Centering
from dinoforge.pretrain.meta_arch import SSLMetaArch
from dinoforge.pretrain.optim import clip_grad_norms


def _load(fixtures_dir: Path, name: str) -> dict:
    return torch.load(fixtures_dir / name, weights_only=True)


def _save(directory: Path, name: str, fixture: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, directory / name)
    return directory


def _dup_rows(t: torch.Tensor, n_groups: int, batch: int) -> torch.Tensor:
    """Crop-major ``[n_groups * B, ...]`` -> ``[n_groups * 2B, ...]`` with image b + B a copy of image b."""
    grouped = t.reshape(n_groups, batch, *t.shape[1:])
    return torch.cat([grouped, grouped], 1).flatten(0, 1)


def _double_images_dino(fx: dict) -> dict:
    b, n_local = int(fx["B"]), int(fx["n_local_crops"])
    out = {**fx, "B": 2 * b}
    for s in range(int(fx["num_steps"])):
        p = f"step{s}/"
        out[p + "teacher_logits"] = _dup_rows(fx[p + "teacher_logits"], 2, b)
        out[p + "student_logits_global"] = _dup_rows(fx[p + "student_logits_global"], 2, b)
        out[p + "student_logits_local"] = _dup_rows(fx[p + "student_logits_local"], n_local, b)
        out[p + "teacher_probs_swapped"] = torch.cat([fx[p + "teacher_probs_swapped"]] * 2, 1)
        out[p + "grad_student_logits_global"] = _dup_rows(fx[p + "grad_student_logits_global"], 2, b) / 2
        out[p + "grad_student_logits_local"] = _dup_rows(fx[p + "grad_student_logits_local"], n_local, b) / 2
    return out


def _double_prototypes_dino(fx: dict) -> dict:
    n_local, terms = int(fx["n_local_crops"]), int(fx["n_loss_terms"])
    out = {**fx, "K": 2 * int(fx["K"])}
    for key, value in fx.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        twice = torch.cat([value, value], -1)
        out[key] = twice / 2 if key.endswith(("teacher_probs_swapped", "grad_student_logits_global",
                                              "grad_student_logits_local")) else twice
    for s in range(int(fx["num_steps"])):
        p = f"step{s}/"
        out[p + "dino_local_crops_loss"] = fx[p + "dino_local_crops_loss"] + 2 * n_local * math.log(2) / terms
        out[p + "dino_global_crops_loss"] = fx[p + "dino_global_crops_loss"] + 2 * math.log(2) / terms
    return out


def _double_images_ibot(fx: dict) -> dict:
    b = int(fx["B"])
    out = {**fx, "B": 2 * b}
    for s in range(int(fx["num_steps"])):
        p = f"step{s}/"
        masks = fx[p + "masks"]
        token = torch.full(masks.shape, -1, dtype=torch.long)
        token[masks] = torch.arange(int(masks.sum()))
        new_masks = _dup_rows(masks, 2, b)
        order = _dup_rows(token, 2, b)[new_masks]  # old token of every new masked token, crop-major order
        out[p + "masks"] = new_masks
        out[p + "mask_indices"] = new_masks.flatten().nonzero().flatten()
        out[p + "masks_weight"] = fx[p + "masks_weight"][order]
        out[p + "n_masked_patches"] = len(order)
        for key in ("teacher_logits_masked", "student_logits_masked", "teacher_probs"):
            out[p + key] = fx[p + key][order]
        out[p + "grad_student_logits_masked"] = fx[p + "grad_student_logits_masked"][order] / 2
        if p + "sinkhorn_B_after_all_reduce" in fx:
            out[p + "sinkhorn_B_after_all_reduce"] = len(order)
    return out


def test_cli_passes_every_official_fixture(fixtures_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "dinoforge.core.cli", "parity", str(fixtures_dir), "--json",
                           str(report_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] and not report["unrecognised"]
    cases = {c["case"] for c in report["checks"]}
    files = {case.split(":", 1)[0] for case in cases}
    assert files == {p.name for p in fixtures_dir.glob("*.pt")}  # every file was checked
    for expected in ("masking.pt:grid8/collate_first_draws_masks", "masking.pt:grid8/collate_count_hist_tv",
                     "masking.pt:grid4/generator_hist_worst_tv", "param_groups.pt:optimizer_group_index",
                     "schedules.pt:teacher_temp", "train_step_shared_centering.pt:student_after_step0/stored_grads",
                     "train_step_shared_centering.pt:student_after_step0/chained",
                     "train_step_shared_centering.pt:step1/grad/backbone.pos_embed",
                     "train_step_shared_centering.pt:droppath_step0/droppath_draws_used",
                     "train_step_separate_sinkhorn.pt:step0/teacher_ibot_probs", "koleo.pt:dup_nn_index"):
        assert expected in cases, expected


def test_transformed_sizes_still_pass(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sizes"
    for name in ("dino_loss_centering.pt", "dino_loss_sinkhorn.pt"):
        _save(out, f"b2x_{name}", _double_images_dino(_load(fixtures_dir, name)))
        _save(out, f"k2x_{name}", _double_prototypes_dino(_load(fixtures_dir, name)))
    for name in ("ibot_loss_centering.pt", "ibot_loss_sinkhorn.pt"):
        _save(out, f"b2x_{name}", _double_images_ibot(_load(fixtures_dir, name)))
    step = _load(fixtures_dir, "train_step_shared_centering.pt")  # one step, no optimizer or drop-path section
    keep = {k: v for k, v in step.items()
            if not k.startswith(("step1/", "student_after_", "teacher_after_", "droppath_step0/"))}
    _save(out, "one_step.pt", {**keep, "num_steps": 1})
    report = run_parity(out)
    assert report.passed, report.table(only_failures=True)
    assert any(c.case == "b2x_ibot_loss_sinkhorn.pt:step0/sinkhorn_B_after_all_reduce" for c in report.checks)
    assert len([c for c in report.checks if c.case.startswith("one_step.pt:")]) > 50


def test_perturbed_copies_fail_where_perturbed(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "perturbed"
    dino = _load(fixtures_dir, "dino_loss_centering.pt")
    dino["step1/dino_local_crops_loss"] = dino["step1/dino_local_crops_loss"] * 1.001
    _save(out, "dino.pt", dino)
    step = _load(fixtures_dir, "train_step_separate_sinkhorn.pt")
    grad = step["step0/grad/backbone.blocks.0.attn.qkv.weight"].clone()
    grad[0, 0] += 0.01 * grad.abs().max()
    step["step0/grad/backbone.blocks.0.attn.qkv.weight"] = grad
    _save(out, "step.pt", step)
    masking = {k: v for k, v in _load(fixtures_dir, "masking.pt").items() if not k.startswith("grid8/")}
    masking["grids"] = [4]  # one grid only: still handled
    first = masking["grid4/collate_first_draws_masks"].clone()
    first[7, 3, 5] = ~first[7, 3, 5]
    masking["grid4/collate_first_draws_masks"] = first
    _save(out, "masking.pt", masking)
    report_path = tmp_path / "perturbed.json"
    assert main(["parity", str(out), "--failures-only", "--json", str(report_path)]) == 1
    checks = json.loads(report_path.read_text())["checks"]
    failed = {c["case"] for c in checks if not c["passed"]}
    assert failed == {"dino.pt:step1/dino_local_crops_loss", "step.pt:step0/grad/backbone.blocks.0.attn.qkv.weight",
                      "masking.pt:grid4/collate_first_draws_masks"}
    assert any(c["case"].startswith("masking.pt:grid4/") and c["metric"] == "stat" and c["passed"] for c in checks)


def test_malformed_and_unknown_files_fail_cleanly(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    dino = _load(fixtures_dir, "dino_loss_sinkhorn.pt")
    del dino["step1/teacher_temp"]
    out = _save(tmp_path / "bad", "truncated.pt", dino)
    _save(out, "other.pt", {"weights": torch.zeros(3)})
    report = run_parity(out)
    assert report.unrecognised == ["other.pt"]
    (bad,) = [c for c in report.checks if not c.passed]
    assert bad.case == "truncated.pt:dino_loss" and "step1/teacher_temp" in bad.note
    assert main(["parity", str(out)]) == 1
    assert "no handler recognises this file" in capsys.readouterr().out


# One-line changes to the training step that ``dinoforge pretrain`` runs, and a check each must fail.
_STEP_CHANGES = {
    "no_centre_update": (lambda mp: mp.setattr(Centering, "update", lambda self, logits: None),
                         "train_step_shared_centering.pt:step0/dino_center_next"),
    "no_teacher_ema": (lambda mp: mp.setattr(train_loop, "ema_update", lambda teacher, student, momentum: None),
                       "train_step_shared_centering.pt:teacher_after_step0/stored_grads"),
    "no_clipping": (lambda mp: mp.setattr(SSLMetaArch, "clip_gradients",
                                          lambda self, max_norm: clip_grad_norms(self.student, None)),
                    "train_step_shared_centering.pt:student_after_step0/stored_grads"),
    "no_schedule": (lambda mp: mp.setattr(train_loop, "apply_schedule", lambda optimizer, values: None),
                    "train_step_shared_centering.pt:student_after_step0/stored_grads"),
}


@pytest.fixture(scope="module")
def step_fixture_dir(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the two-step train-step fixture (optimizer step, EMA and drop path)."""
    out = tmp_path_factory.mktemp("train_step")
    (out / "train_step_shared_centering.pt").symlink_to(fixtures_dir / "train_step_shared_centering.pt")
    return out


def test_train_step_fixture_passes_on_the_real_step(step_fixture_dir: Path) -> None:
    report = run_parity(step_fixture_dir)
    assert report.passed, report.table(only_failures=True)
    cases = {c.case.split(":", 1)[1] for c in report.checks}
    assert {"step0/chained/grad_norm_before_clip/dino_head", "teacher_after_step0/chained",
            "step1/dino_center_next", "droppath_step0/grad/backbone.blocks.1.attn.qkv.weight"} <= cases


@pytest.mark.parametrize("change", sorted(_STEP_CHANGES))
def test_a_change_to_the_real_step_fails_parity(change: str, step_fixture_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    apply, must_fail = _STEP_CHANGES[change]
    apply(monkeypatch)
    report = run_parity(step_fixture_dir)
    failed = {c.case for c in report.checks if not c.passed}
    assert not report.passed and must_fail in failed, sorted(failed)[:10]
