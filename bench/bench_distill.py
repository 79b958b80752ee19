"""Distillation step throughput per student size, and the Fashion-MNIST acceptance table.

    python bench/bench_distill.py                       # CPU: ViT-B/14 teacher -> ViT-Ti/14, ViT-S/14 (84 px)
    python bench/bench_distill.py --device cuda --preset vit_gpu   # GPU, bf16: ViT-L/14 -> ViT-S/14, ViT-B/14
    python bench/bench_distill.py --preset fmnist       # the Fashion-MNIST models (28 px, width 128 -> 64)
    python bench/bench_distill.py --quick               # smoke test: tiny models, 2 timed steps
    python bench/bench_distill.py table --teacher-run runs/fmnist \
        --distilled-run runs/distill_fmnist runs/distill_fmnist_head \
        --scratch-run runs/fmnist_student_scratch       # acceptance table (params, time, full-test-set k-NN)

Throughput: one full optimizer step (frozen-teacher pass, student forward/backward, clipping, AdamW, EMA)
through the real ``train_step`` and :class:`~dinoforge.distill.meta.DistillMeta` on synthetic crops (pixel
values do not change speed), with random-init teacher weights. Each row is the median of ``--steps`` (3) timed
steps after 2 warm-up steps; ``shared`` rows run every student in one step (one teacher pass) and compare
with the sum of the single-student steps. Quote numbers measured in one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dinoforge.core.artifact import Provenance, save_artifact
from dinoforge.core.backbone import BackboneConfig, build_backbone, get_arch
from dinoforge.core.backbone.heads import DINOHead, HeadConfig
from dinoforge.core.config import build_config
from dinoforge.distill.config import DistillConfig
from dinoforge.distill.meta import DistillMeta
from dinoforge.distill.students import build_students
from dinoforge.distill.teacher import load_teacher
from dinoforge.pretrain.data import batch_loader
from dinoforge.pretrain.masking import mask_statistics
from dinoforge.pretrain.optim import OptimConfig, build_optimizer
from dinoforge.pretrain.spikes import SpikeConfig, SpikeDetector
from dinoforge.pretrain.train_loop import make_precision, move_batch, train_step

VALUES = {"lr": 1e-4, "wd": 0.04, "momentum": 0.999, "teacher_temp": 0.07, "last_layer_lr": 1e-4}
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: official architectures and head width, small crops and batch (6x6 global, 3x3 local grids).
    "vit": {"teacher": "vitb14", "students": ["vitti14", "vits14"], "image": 84, "local": 42, "n_local": 2,
            "batch": 4, "prototypes": 4096, "head": (2048, 256)},
    # GPU-sized: the official crops (224 / 98 px, 8 local crops) and K = 65536, ViT-L/14 teacher.
    "vit_gpu": {"teacher": "vitl14", "students": ["vits14", "vitb14"], "image": 224, "local": 98, "n_local": 8,
                "batch": 32, "prototypes": 65536, "head": (2048, 256)},
    "quick": {"teacher": "test", "students": ["test", "test_reg4"], "image": 56, "local": 28, "n_local": 2, "batch": 4,
              "prototypes": 256, "head": (64, 32)},
}


def _arch(spec: str | dict[str, Any], image: int) -> dict[str, Any]:
    base = get_arch(spec) if isinstance(spec, str) else get_arch("test", **spec)
    return {**base.model_dump(), "img_size": image, "drop_path_rate": 0.0}


def _label(spec: str | dict[str, Any]) -> str:
    return spec if isinstance(spec, str) else f"w{spec['embed_dim']}d{spec['depth']}p{spec['patch_size']}"


def _teacher_artifact(root: Path, preset: dict[str, Any]) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(**_arch(preset["teacher"], preset["image"])))
    hidden, bottleneck = preset["head"]
    head = DINOHead(HeadConfig(in_dim=backbone.embed_dim, out_dim=preset["prototypes"], hidden_dim=hidden,
                               bottleneck_dim=bottleneck))
    return save_artifact(root / "teacher", backbone, name="bench-teacher", provenance=Provenance(source="random-init"),
                         heads={"dino_head": head}, overwrite=True)


def _config(teacher: Path, preset: dict[str, Any], students: list[Any], mode: str, device: str,
            precision: str) -> DistillConfig:
    names = [_label(s) for s in students]
    data = {"run_dir": "unused", "mode": mode,
            "teacher": {"path": str(teacher), "precision": "bf16" if precision == "bf16" else "fp32"},
            "students": [{"name": n, "backbone": _arch(s, preset["image"])} for n, s in zip(names, students, strict=True)],
            "crops": {"global_crops_size": preset["image"], "local_crops_size": preset["local"],
                      "local_crops_number": preset["n_local"], "blur_kernel_size": 3},
            "data": {"batch_size": preset["batch"]}, "train": {"device": device, "precision": precision}}
    return build_config(DistillConfig, data, source="bench")


def _batch(cfg: DistillConfig, patch: int, device: torch.device) -> dict[str, Any]:
    b, crops = cfg.data.batch_size, cfg.crops
    g, loc = crops.global_crops_size, crops.local_crops_size
    masks = torch.zeros(2 * b, (g // patch) ** 2, dtype=torch.bool)
    batch = {"global_crops": torch.randn(2 * b, 3, g, g),  # [2B, 3, G, G]
             "local_crops": torch.randn(crops.local_crops_number * b, 3, loc, loc),  # [nL*B, 3, l, l]
             **mask_statistics(masks), "upperbound": 0}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg: DistillConfig, steps: int) -> dict[str, float]:
    """Median seconds of a full distillation step (and of the teacher pass alone) for ``cfg``."""
    device = torch.device(cfg.train.device)
    teacher, _ = load_teacher(cfg.teacher)
    slots, modules = build_students(cfg, teacher)
    meta = DistillMeta(cfg, teacher, slots, modules).to(device).train()
    optimizer = build_optimizer(meta.student, OptimConfig())
    precision = make_precision(cfg.train.precision, device)
    detector = SpikeDetector(SpikeConfig(policy="off"))
    batch = _batch(cfg, slots[0].backbone.patch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        train_step(meta, [batch], values=VALUES, optimizer=optimizer, precision=precision, clip_grad=3.0,
                   detector=detector, student=meta.student, teacher=meta.teacher, device=device)

    def teacher_pass() -> None:
        with precision.autocast():
            meta.frozen.features([batch["global_crops"]])

    out = {}
    for name, fn in (("step_s", step), ("teacher_s", teacher_pass)):
        times = []
        for i in range(steps + 2):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    out["img_per_s"] = cfg.data.batch_size / out["step_s"]
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _time_trainer(trainer: Any, steps: int) -> float:
    """Median seconds of the trainer's own step on its own (pre-generated, real) batches."""
    loader = batch_loader(trainer.parts.batches, start=0, stop=steps + 2, num_workers=0)
    micro_batches = [[move_batch(b, trainer.rt.device) for b in micro] for micro in loader]
    trainer.parts.model.train()
    times = []
    for i, micro in enumerate(micro_batches):
        _sync(trainer.rt.device)
        start = time.perf_counter()
        train_step(trainer.parts.model, micro, values=trainer.schedules.at(i), optimizer=trainer.optimizer,
                   precision=trainer.precision, clip_grad=trainer.cfg.optim.clip_grad, detector=trainer.detector,
                   student=trainer.parts.student, teacher=trainer.parts.teacher, device=trainer.rt.device)
        _sync(trainer.rt.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_fmnist(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The bundled Fashion-MNIST recipes as the trainers build them: distillation (head and feature mode)
    against the ``fmnist`` pretraining teacher architecture, and pretraining the same student from scratch.

    The teacher has random weights (speed does not depend on them); batches are real multi-crop batches.
    The ratio of the scratch and distillation step times sizes the scratch run of the acceptance table.
    """
    from dinoforge.distill.config import load_distill_config
    from dinoforge.distill.trainer import distill_trainer
    from dinoforge.pretrain.config import load_pretrain_config
    from dinoforge.pretrain.meta_arch import build_student
    from dinoforge.pretrain.pretrain_run import pretrain_trainer

    device = "cuda" if args.device == "cuda" else "cpu"
    common = ["knn.at_end=false", "knn.at_start=false", "knn.every_steps=null", f"train.device={device}",
              "monitor.progress=false", "data.num_workers=0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = load_pretrain_config("fmnist", [f"run_dir={tmp}/scratch", *common])
        torch.manual_seed(0)
        model = build_student(pre.model)
        teacher = save_artifact(Path(tmp) / "teacher", model["backbone"], name="bench-fmnist-teacher",
                                provenance=Provenance(source="random-init"), heads={"dino_head": model["dino_head"]})
        student = None
        for recipe in ("fmnist", "fmnist_head"):
            cfg = load_distill_config(recipe, [f"run_dir={tmp}/{recipe}", f"teacher.path={teacher}", *common])
            student = cfg.students[0].backbone_config()
            rows.append({"device": device, "precision": cfg.train.precision, "mode": f"distill {cfg.mode}",
                         "students": cfg.students[0].name, "batch": cfg.data.batch_size,
                         "step_s": _time_trainer(distill_trainer(cfg), args.steps)})
        scratch = pre.model_copy(update={"model": pre.model.model_copy(update={"backbone": student})})
        rows.append({"device": device, "precision": scratch.train.precision, "mode": "pretrain from scratch",
                     "students": "same student", "batch": pre.data.batch_size,
                     "step_s": _time_trainer(pretrain_trainer(scratch), args.steps)})
    for row in rows:  # each recipe has its own batch size
        row["img_per_s"] = row["batch"] / row["step_s"]
        print(f"| {row['device']} {row['precision']} | {row['mode']} | {row['students']} | {row['step_s']:.3f} | "
              f"{row['img_per_s']:.1f} | - |", flush=True)
    return rows


def _devices(choice: str) -> list[tuple[str, str]]:
    cpu, gpu = ("cpu", "fp32"), ("cuda", "bf16")
    if choice == "cpu":
        return [cpu]
    if choice == "cuda":
        return [gpu]
    return [cpu, gpu] if torch.cuda.is_available() else [cpu]


def run_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (device, mode, student) row plus one shared multi-student row per (device, mode)."""
    preset = PRESETS["quick" if args.quick else args.preset]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher_artifact(Path(tmp), preset)
        for device, precision in _devices(args.device):
            for mode in args.modes:
                single = []
                for student in preset["students"]:
                    res = time_steps(_config(teacher, preset, [student], mode, device, precision), args.steps)
                    single.append(res["step_s"])
                    rows.append({"device": device, "precision": precision, "mode": mode, "students": _label(student),
                                 **res})
                    print(_row(rows[-1]), flush=True)
                if len(preset["students"]) > 1:
                    res = time_steps(_config(teacher, preset, preset["students"], mode, device, precision), args.steps)
                    res["separate_sum_s"] = sum(single)
                    rows.append({"device": device, "precision": precision, "mode": mode,
                                 "students": "shared: " + "+".join(map(_label, preset["students"])), **res})
                    print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict[str, Any]) -> str:
    extra = f" (separate steps: {r['separate_sum_s']:.3f} s)" if "separate_sum_s" in r else ""
    mem = f", peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""
    return (f"| {r['device']} {r['precision']} | {r['mode']} | {r['students']} | {r['step_s']:.3f}{extra} | "
            f"{r['img_per_s']:.1f} | {r['teacher_s']:.3f}{mem} |")


def run_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Params, training time and full-test-set k-NN of teacher, distilled student and scratch student."""
    from dinoforge.core.artifact import read_card
    from dinoforge.core.eval.model import load_eval_model
    from dinoforge.core.eval.runner import run_knn
    from dinoforge.pretrain.monitor import read_metrics

    import yaml

    runs = [("teacher", args.teacher_run, args.teacher_run / "artifact")]
    for run in args.distilled_run:
        mode = yaml.safe_load((run / "config.yaml").read_text())["mode"]
        runs.append((f"student, distilled ({mode} mode)", run, _distilled(run, args.student)))
    runs.append(("student, from scratch", args.scratch_run, args.scratch_run / "artifact"))
    rows = []
    for role, run, artifact in runs:
        card = read_card(artifact)
        train = [r for r in read_metrics(run) if "train_seconds" in r]
        report = run_knn(load_eval_model(artifact), args.knn_train, args.knn_test, ks=(args.k,), progress=False)
        rows.append({"role": role, "artifact": str(artifact), "params": card.num_parameters,
                     "steps": train[-1]["step"] if train else None,
                     "images": train[-1].get("images_seen") if train else None,
                     "train_minutes": train[-1]["train_seconds"] / 60 if train else None,
                     "knn_top1": report["results"]["cls"]["top1"][str(args.k)]})
    ref = rows[0]["knn_top1"]
    print(f"| model | parameters | steps | images | training time | k-NN top-1 (k={args.k}) | of teacher |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        minutes = f"{r['train_minutes']:.1f} min" if r["train_minutes"] is not None else "-"
        print(f"| {r['role']} | {r['params']:,} | {r['steps']} | {r['images']} | {minutes} | "
              f"{r['knn_top1']:.2f}% | {100 * r['knn_top1'] / ref:.1f}% |")
    return rows


def _distilled(run: Path, student: str | None) -> Path:
    found = sorted((run / "artifacts").glob("*/model.json"))
    names = [p.parent.name for p in found]
    if student is None and len(names) != 1:
        sys.exit(f"{run}/artifacts holds students {names}; pick one with --student")
    return run / "artifacts" / (student or names[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", nargs="?", default="throughput", choices=["throughput", "table"])
    parser.add_argument("--preset", default="vit", choices=[*sorted(PRESETS), "fmnist"])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, 2 timed steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, and GPU if any")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["head", "feature"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--teacher-run", type=Path, help="table: the pretraining run of the teacher")
    parser.add_argument("--distilled-run", type=Path, nargs="+", help="table: one or more distillation runs")
    parser.add_argument("--scratch-run", type=Path, help="table: the student's pretraining run from scratch")
    parser.add_argument("--student", help="table: the student of the distillation run (default: the only one)")
    parser.add_argument("--knn-train", default="fmnist:train")
    parser.add_argument("--knn-test", default="fmnist:test")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = 2
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    if args.task == "table":
        if not (args.teacher_run and args.distilled_run and args.scratch_run):
            parser.error("table needs --teacher-run, --distilled-run and --scratch-run")
        rows = run_table(args)
    else:
        print("| device | mode | students | s / step (median) | img/s | teacher pass s |")
        print("|---|---|---|---|---|---|")
        rows = run_fmnist(args) if args.preset == "fmnist" else run_throughput(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
