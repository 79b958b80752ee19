"""Inference throughput of a DINOv2 backbone (fp32, eager) beside the machine's theoretical ceiling.

    python bench/bench_inference.py                       # ViT-S/14 at 224 px, batch 8 and 32
    python bench/bench_inference.py --batch-sizes 1,8,32 --repeats 20 --json bench-inference.json
    python bench/bench_inference.py --quick               # smoke test: tiny model, a few seconds

Ceiling = measured peak matmul FLOP/s (float32 GEMM, the best median over a few square sizes, same thread
count) / FLOPs per image (counted with ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and
attention; element-wise ops such as LayerNorm, GELU and softmax are not counted, so the ceiling is slightly
optimistic). Weights are random: speed does not depend on their values. Quote medians measured in one run on
a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dinoforge.core.backbone import build_backbone


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def peak_matmul_flops(sizes: Sequence[int], *, device: torch.device, warmup: int, repeats: int,
                      sync: Callable[[], None]) -> tuple[float, int]:
    """Best median float32 GEMM rate over square sizes: ``(FLOP/s, n)`` (one n x n x n GEMM = 2 n^3 FLOPs)."""
    best = (0.0, 0)
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        med = statistics.median(timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, sync=sync))
        best = max(best, (2.0 * n ** 3 / med, n))
    return best


def _extra_formulas() -> dict[object, Callable[..., int]]:
    # FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA dispatches to
    # on CPU: without this entry the two attention matmuls of every block would not be counted.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flops} if op is not None else {}


def _cpu_sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                    *_args: object, **_kwargs: object) -> int:
    # Two batched matmuls: scores = q k^T and out = softmax(scores) v; q/k/v are [B, heads, T, d].
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flops_per_image(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image, as counted by ``FlopCounterMode`` (attention included)."""
    x = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with torch.inference_mode(), counter:
        model.forward_features(x)
    return int(counter.get_total_flops())


def bench_model(model: torch.nn.Module, image_size: int, batch: int, *, device: torch.device, warmup: int,
                repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per forward pass of ``batch`` images (fp32, eager, inference mode)."""
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def step() -> None:
        with torch.inference_mode():
            model.forward_features(x)

    return timed(step, warmup=warmup, repeats=repeats, sync=sync)


def environment(device: torch.device) -> dict[str, object]:
    """Machine and versions printed with the table."""
    import timm

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "mkldnn": torch.backends.mkldnn.is_available()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vits14", help="registered architecture (default vits14)")
    p.add_argument("--image-size", type=int, default=224, help="square input side (default 224)")
    p.add_argument("--batch-sizes", default="8,32", help="comma-separated batch sizes (default 8,32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes per batch size (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per batch size (default 10)")
    p.add_argument("--gemm-sizes", default="1024,2048,4096", help="square GEMM sizes for the peak (default "
                                                                 "1024,2048,4096)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: 'test' model at 56 px, batch 2 and 4, "
                                                        "2 repeats, small GEMMs")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.image_size, args.batch_sizes = "test", 56, "2,4"
        args.warmup, args.repeats, args.gemm_sizes = 1, 2, "128,256"
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure and return everything the table shows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_backbone(args.arch).eval().to(device)
    flops = flops_per_image(model, args.image_size, device)
    peak, gemm_n = peak_matmul_flops([int(s) for s in args.gemm_sizes.split(",")], device=device,
                                     warmup=args.warmup, repeats=args.repeats, sync=sync)
    ceiling = peak / flops
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times = bench_model(model, args.image_size, batch, device=device, warmup=args.warmup,
                            repeats=args.repeats, sync=sync)
        med = statistics.median(times)
        rows.append({"batch": batch, "median_s": med, "min_s": min(times), "max_s": max(times),
                     "img_per_s": batch / med, "ceiling_img_per_s": ceiling,
                     "fraction_of_ceiling": batch / med / ceiling, "achieved_gflops": batch * flops / med / 1e9})
    return {"arch": args.arch, "image_size": args.image_size, "precision": "fp32", "mode": "eager",
            "flops_per_image": flops, "peak_matmul_flops": peak, "peak_gemm_n": gemm_n, "repeats": args.repeats,
            "rows": rows, "environment": environment(device), "command": " ".join(sys.argv)}


def markdown(result: dict) -> str:
    """The results as a Markdown table plus the machine/version lines."""
    env = result["environment"]
    lines = [f"{result['arch']} at {result['image_size']} px, {result['precision']} {result['mode']}: "
             f"{result['flops_per_image'] / 1e9:.4g} GFLOP/image (FlopCounterMode); peak float32 GEMM "
             f"{result['peak_matmul_flops'] / 1e9:.1f} GFLOP/s (n={result['peak_gemm_n']})", "",
             "| batch | median s/batch | img/s | ceiling img/s | % of ceiling | achieved GFLOP/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['median_s']:.4f} | {r['img_per_s']:.1f} | {r['ceiling_img_per_s']:.1f} "
                     f"| {100 * r['fraction_of_ceiling']:.0f}% | {r['achieved_gflops']:.1f} |")
    lines += ["", f"machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch "
                  f"threads, device {env['device']}",
              f"versions: torch {env['torch']}, timm {env['timm']}, Python {env['python']} ({env['platform']})",
              f"command: {result['command']} ({result['repeats']} timed passes per row, medians)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
