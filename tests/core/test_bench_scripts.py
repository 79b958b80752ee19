"""bench/pretrain_sweep.py runs its variants for real; bench_curate's synthetic embeddings have the documented
geometry and bench/copy_difficulty.py scores copies as documented (docs/benchmarks.md#curation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from bench_curate import synthetic_chunks  # noqa: E402
from knn_paired import mcnemar_p  # noqa: E402
from knn_variants import score_variants, variant_features  # noqa: E402


@pytest.mark.slow
def test_pretrain_sweep_runs_each_variant_and_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "pretrain_sweep.py"), "--smoke", "--workdir",
                          str(tmp_path / "runs"), "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"base", "sk"}
    for r in results.values():
        assert r["rc"] == 0 and r["steps"] == 4 and 0 < r["teacher_entropy"] <= 1
    sk_config = (tmp_path / "runs" / "sk" / "config.yaml").read_text()
    assert "sinkhorn_knopp" in sk_config  # the override reached the run
    assert "| base | (recipe) | 4 |" in res.stdout


def test_pretrain_sweep_rejects_a_nameless_variant(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "bench" / "pretrain_sweep.py"), "--variant", "=x=1"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode != 0 and "has no name" in res.stderr


def test_pretrain_sweep_keeps_list_values_of_a_variant_whole() -> None:
    from pretrain_sweep import Variant

    v = Variant.parse("photo=crops.color_jitter=[0.2,0.2,0,0],crops.solarize_p=0,crops.ratio=[0.75,1.33]")
    assert v.name == "photo"
    assert v.overrides == ["crops.color_jitter=[0.2,0.2,0,0]", "crops.solarize_p=0", "crops.ratio=[0.75,1.33]"]
    assert Variant.parse("base=").overrides == []


def test_pretrain_sweep_rejects_zero_parallel_runs(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "bench" / "pretrain_sweep.py"), "--parallel", "0"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "--parallel and --threads must be >= 1" in res.stderr
    assert not (tmp_path / "runs").exists()  # rejected before any run folder is made


def _neighbour_cosines(x: np.ndarray, queries: int) -> np.ndarray:
    x = x.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x[:queries] @ x.T  # [q, n]
    sims[np.arange(queries), np.arange(queries)] = -1.0
    return np.sort(sims, axis=1)[:, ::-1]  # best first


def test_hierarchical_embeddings_have_tight_groups_and_planted_copies() -> None:
    x, dup = next(synthetic_chunks(50_000, 384, clusters=500, dup_fraction=0.01, seed=0, chunk=50_000,
                                   distribution="hierarchical"))
    assert x.dtype == np.float16 and x.shape == (50_000, 384) and 0.005 < dup.mean() < 0.02
    sims = _neighbour_cosines(x, 500)
    assert np.median(sims[:, 0]) > 0.8  # images of one group
    assert np.median(sims[:, 11]) < 0.7  # beyond the ~10 images of a group: other groups of the concept
    assert abs(np.median(sims)) < 0.1  # most pairs: different concepts, unrelated directions
    planted = np.nonzero(dup)[0]
    a = x[planted].astype(np.float32)
    b = x[planted - 1].astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99  # near-copies of the row before them


def test_isotropic_embeddings_have_weak_neighbours() -> None:
    x, _ = next(synthetic_chunks(20_000, 384, clusters=200, dup_fraction=0.0, seed=0, chunk=20_000))
    sims = _neighbour_cosines(x, 300)
    # the 10th neighbour is barely closer than the 50th: the documented worst case for partition indexes
    assert np.median(sims[:, 9]) - np.median(sims[:, 49]) < 0.1


def test_separability_scores_a_known_similarity_matrix() -> None:
    from copy_difficulty import separability

    # 20 copies of the first 20 of 40 images; copy i scores 0.9 + i/1000 with its original, 0.5 elsewhere,
    # except copy 0 whose best impostor (image 30) scores 0.95
    sims_copy = np.full((20, 40), 0.5)
    sims_copy[np.arange(20), np.arange(20)] = 0.9 + np.arange(20) / 1000
    sims_copy[0, 30] = 0.95
    sims_pool = np.full((40, 40), 0.2)
    sims_pool[5, 6] = sims_pool[6, 5] = 0.92  # one natural near-pair above the threshold
    np.fill_diagonal(sims_pool, 1.0)  # ignored
    r = separability(sims_copy, sims_pool, np.arange(20))
    assert r["top1"] == pytest.approx(19 / 20)
    assert r["threshold"] == pytest.approx(np.quantile(0.9 + np.arange(20) / 1000, 0.05))
    assert r["impostor_above"] == pytest.approx(1 / 20)
    assert r["natural_above"] == pytest.approx(2 / 40)


def test_copy_difficulty_runs_on_real_images(tmp_path: Path) -> None:
    out = tmp_path / "difficulty.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "copy_difficulty.py"), "--source",
                          "fmnist:test[:200]", "--copies", "20", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(0 <= r["top1"] <= 1 and -1 <= r["threshold"] <= 1 for r in rows)
    assert "| pixels 28px blur 0.0 |" in res.stdout
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "copy_difficulty.py"), "--source",
                          "fmnist:test[:10]", "--copies", "20"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "exceeds the 10 images" in bad.stderr
    none = subprocess.run([sys.executable, str(REPO / "bench" / "copy_difficulty.py"), "--copies", "0"],
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 2 and "--copies must be >= 1" in none.stderr


def test_mcnemar_p_matches_the_exact_binomial_test() -> None:
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all 6 discordant pairs one way: 2 * 0.5**6
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 0.5)
    assert mcnemar_p(581, 555) == pytest.approx(mcnemar_p(555, 581)) and 0.4 < mcnemar_p(581, 555) < 0.5


@pytest.mark.slow
def test_knn_paired_counts_discordant_pairs_on_real_images(tmp_path: Path) -> None:
    data = ["--train", "fmnist:train[~600@0]", "--test", "fmnist:test[~200@0]", "--k", "10"]
    res = subprocess.run([sys.executable, str(REPO / "bench" / "knn_paired.py"), "pixels", "pixels", *data],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # a model against itself: identical predictions, no discordant pair, p = 1
    assert out["n_test"] == 200 and out["top1_a"] == out["top1_b"] > 50
    assert out["a_right_b_wrong"] == out["b_right_a_wrong"] == 0 and out["mcnemar_p"] == 1.0
    art = tmp_path / "rand"
    subprocess.run([sys.executable, "-m", "dinoforge.core.cli", "init", "test", "--out", str(art)], check=True,
                   capture_output=True)
    res = subprocess.run([sys.executable, str(REPO / "bench" / "knn_paired.py"), "pixels", str(art), *data],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # the accuracy gap is exactly the difference of the discordant counts
    assert out["a_right_b_wrong"] + out["b_right_a_wrong"] > 0
    gap = (out["a_right_b_wrong"] - out["b_right_a_wrong"]) / 2
    assert out["top1_a"] - out["top1_b"] == pytest.approx(gap, abs=0.011)
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "knn_paired.py"), "pixels", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_knn_variants_protocol_row_is_the_core_knn_and_flip_centre_do_what_they_say() -> None:
    from dinoforge.core.eval.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(80, 16, generator=g)
    train_y, test_y = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (80,), generator=g)
    train_m, test_m = torch.randn(300, 16, generator=g), torch.randn(80, 16, generator=g)
    acc = score_variants({"plain": train, "mirror": train_m}, {"plain": test, "mirror": test_m}, train_y, test_y,
                         k=10, temperature=0.07, num_classes=4)
    ref = knn_classify(train, train_y, test, test_y, ks=(10,), temperature=0.07, num_classes=4)
    assert acc["protocol"] == pytest.approx(ref.top1[10], abs=0.006)
    # a mirror-symmetric feature: flip averaging only rescales it, so every neighbour and vote is unchanged
    sym = score_variants({"plain": train, "mirror": train}, {"plain": test, "mirror": test}, train_y, test_y,
                         k=10, temperature=0.07, num_classes=4)
    assert sym["flip"] == sym["protocol"] and sym["flip+centred"] == sym["centred"]
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    mean = torch.tensor([0.3, 0.9])
    assert torch.allclose(variant_features(x, x, "protocol"), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(variant_features(x, x.flip(-1), "flip"), torch.tensor([[1.4, 1.4], [1.0, 1.0]]))
    assert torch.allclose(variant_features(x, x, "centred", mean), torch.tensor([[0.3, -0.1], [-0.3, 0.1]]))
    with pytest.raises(ValueError, match="training-set mean"):
        variant_features(x, x, "centred")


@pytest.mark.slow
def test_knn_variants_scores_pixels_and_a_model_on_real_images(tmp_path: Path) -> None:
    art = tmp_path / "rand"
    subprocess.run([sys.executable, "-m", "dinoforge.core.cli", "init", "test", "--out", str(art)], check=True,
                   capture_output=True)
    data = ["--train", "fmnist:train[~600@0]", "--test", "fmnist:test[~200@0]", "--k", "10"]
    out = tmp_path / "v.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "knn_variants.py"), "pixels", str(art), *data,
                          "--sizes", "28,42", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [("pixels", None), (str(art), 28), (str(art), 42)]
    for r in rows:
        assert all(0 < r[v] <= 100 for v in ("protocol", "flip", "centred", "flip+centred"))
    assert rows[0]["protocol"] > 50  # raw-pixel neighbours on Fashion-MNIST
    assert f"| {art} | 42 |" in res.stdout
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "knn_variants.py"), str(tmp_path / "nope"), *data],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    for extra in (["--sizes", "0"], ["--sizes", "abc"], ["--json", str(tmp_path / "no" / "v.json")],
                  ["--temperature", "0"], ["--k", "0"]):
        bad = subprocess.run([sys.executable, str(REPO / "bench" / "knn_variants.py"), "pixels", *data, *extra],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr, extra
    assert not (tmp_path / "no").exists()
