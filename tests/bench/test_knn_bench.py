"""bench/knn_paired.py and bench/knn_variants.py: their statistics against closed forms and core's k-NN, and
end to end on real Fashion-MNIST images (a model against itself, pixels against a random model, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from knn_paired import mcnemar_p
from knn_variants import score_variants, variant_features

from tests.bench.conftest import RunBench

DATA = ["--train", "fmnist:train[~600@0]", "--test", "fmnist:test[~200@0]", "--k", "10"]


def test_mcnemar_p_matches_the_exact_binomial_test() -> None:
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all 6 discordant pairs one way: 2 * 0.5**6
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 0.5)
    assert mcnemar_p(581, 555) == pytest.approx(mcnemar_p(555, 581)) and 0.4 < mcnemar_p(581, 555) < 0.5


@pytest.mark.slow
def test_knn_paired_counts_discordant_pairs_on_real_images(tmp_path: Path, run_bench: RunBench,
                                                           random_artifact: Path) -> None:
    res = run_bench("knn_paired.py", "pixels", "pixels", *DATA, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # a model against itself: identical predictions, no discordant pair, p = 1
    assert out["n_test"] == 200 and out["top1_a"] == out["top1_b"] > 50
    assert out["a_right_b_wrong"] == out["b_right_a_wrong"] == 0 and out["mcnemar_p"] == 1.0
    res = run_bench("knn_paired.py", "pixels", str(random_artifact), *DATA, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # the accuracy gap is exactly the difference of the discordant counts
    assert out["a_right_b_wrong"] + out["b_right_a_wrong"] > 0
    gap = (out["a_right_b_wrong"] - out["b_right_a_wrong"]) / 2
    assert out["top1_a"] - out["top1_b"] == pytest.approx(gap, abs=0.011)
    bad = run_bench("knn_paired.py", "pixels", str(tmp_path / "nope"), *DATA, cwd=tmp_path)
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
def test_knn_variants_scores_pixels_and_a_model_on_real_images(tmp_path: Path, run_bench: RunBench,
                                                               random_artifact: Path) -> None:
    art, out = random_artifact, tmp_path / "v.json"
    res = run_bench("knn_variants.py", "pixels", str(art), *DATA, "--sizes", "28,42", "--json", str(out),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [("pixels", None), (str(art), 28), (str(art), 42)]
    for r in rows:
        assert all(0 < r[v] <= 100 for v in ("protocol", "flip", "centred", "flip+centred"))
    assert rows[0]["protocol"] > 50  # raw-pixel neighbours on Fashion-MNIST
    assert f"| {art} | 42 |" in res.stdout
    bad = run_bench("knn_variants.py", str(tmp_path / "nope"), *DATA, cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    for extra in (["--sizes", "0"], ["--sizes", "abc"], ["--json", str(tmp_path / "no" / "v.json")],
                  ["--temperature", "0"], ["--k", "0"]):
        bad = run_bench("knn_variants.py", "pixels", *DATA, *extra, cwd=tmp_path)
        assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr, extra
    assert not (tmp_path / "no").exists()
