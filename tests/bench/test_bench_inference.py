"""Smoke test of bench/bench_inference.py: runs end to end, and its FLOP count equals the analytic one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from bench_inference import flops_per_image

from dinoforge.core.backbone import build_backbone, get_arch
from tests.bench.conftest import RunBench


def analytic_vit_flops(arch: str, image_size: int, **overrides: object) -> int:
    """Multiply-adds x 2 of patch embedding, qkv/proj/MLP linears and the two attention matmuls per block."""
    c = get_arch(arch, **overrides)
    n = (image_size // c.patch_size) ** 2
    t = 1 + c.num_register_tokens + n
    d, h = c.embed_dim, c.hidden_dim
    per_block = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * h + 2 * 2 * t * t * d
    return 2 * n * (3 * c.patch_size ** 2) * d + c.depth * per_block


def test_quick_run_prints_table_and_counts_flops(tmp_path: Path, run_bench: RunBench) -> None:
    out = tmp_path / "bench.json"
    res = run_bench("bench_inference.py", "--quick", "--threads", "1", "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "| batch | median s/batch | img/s | ceiling img/s |" in res.stdout and "machine:" in res.stdout
    result = json.loads(out.read_text())
    assert result["flops_per_image"] == analytic_vit_flops("test", 56)
    assert result["peak_matmul_flops"] > 1e8 and result["environment"]["torch_threads"] == 1
    assert [r["batch"] for r in result["rows"]] == [2, 4]
    for row in result["rows"]:
        assert row["img_per_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert abs(row["ceiling_img_per_s"] - result["peak_matmul_flops"] / result["flops_per_image"]) < 1e-6


def test_vits14_flops_match_analytic_count() -> None:
    """ViT-S/14 widths with registers at 224 px (one block keeps the test fast; the count is per block)."""
    model = build_backbone("vits14_reg4", depth=1).eval().to("meta")  # shapes only: nothing is computed
    counted = flops_per_image(model, 224, torch.device("meta"))
    assert counted == analytic_vit_flops("vits14_reg4", 224, depth=1)
