"""Losses and teacher normalisation against brute-force float64 references and their defining properties.

The official numbers themselves are checked by ``test_parity.py`` (golden fixtures); here every loss is
re-derived independently (pair loops, per-crop means, pairwise-distance nearest neighbours, log-domain
Sinkhorn) and the multi-rank semantics are exercised with two real gloo processes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from dinoforge.pretrain.losses import (
    Centering,
    dino_global_loss,
    dino_local_loss,
    ibot_masked_loss,
    koleo_loss,
    n_loss_terms,
    sinkhorn_knopp,
    swap_global_crops,
)
from dinoforge.pretrain.masking import mask_statistics


def _ce64(p: torch.Tensor, s: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Per-row cross-entropy ``-sum p log_softmax(s / T)`` in float64."""
    return -(p.double() * torch.log_softmax(s.double() / temp, dim=-1)).sum(-1)


def _sinkhorn_log64(logits: torch.Tensor, temp: float, iters: int) -> torch.Tensor:
    """Log-domain float64 Sinkhorn-Knopp (a different algorithm with the same fixed-point iteration)."""
    n, k = logits.shape
    log_q = logits.double().t() / temp  # [K, n]
    log_q = log_q - torch.logsumexp(log_q.flatten(), 0)
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(n)
    return (log_q + math.log(n)).exp().t()


def test_sinkhorn_matches_log_domain_reference_and_rows_sum_to_one() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 40, generator=g) * 0.5  # |logit| / temp well below the float32 exp limit
    probs = sinkhorn_knopp(logits, 0.07)
    assert probs.shape == (24, 40) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), _sinkhorn_log64(logits, 0.07, 3), atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(24), atol=1e-5, rtol=0)


def test_sinkhorn_balances_prototypes_and_is_row_equivariant() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 16, generator=g) + torch.linspace(0, 3, 16)  # strongly preferred prototypes
    softmax_mass = torch.softmax(logits / 0.1, -1).sum(0)  # [K]
    three = sinkhorn_knopp(logits, 0.1).sum(0)
    many = sinkhorn_knopp(logits, 0.1, n_iterations=200).sum(0)
    target = 64 / 16
    # Equipartition: more iterations -> every prototype gets n / K of the mass.
    assert (three - target).abs().max() < 0.5 * (softmax_mass - target).abs().max()
    torch.testing.assert_close(many, torch.full((16,), target), atol=1e-2, rtol=0)
    assert (softmax_mass - target).abs().max() > 1.0  # the test data is far from balanced to begin with
    perm = torch.randperm(64, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(logits[perm], 0.1), sinkhorn_knopp(logits, 0.1)[perm])


def test_sinkhorn_keeps_the_official_overflow() -> None:
    """No max-subtraction (official): a logit / temperature ratio above ~88 overflows float32 exp."""
    logits = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert not torch.isfinite(sinkhorn_knopp(logits, 0.1)).all()  # exp(100) = inf
    assert torch.isfinite(sinkhorn_knopp(logits, 0.2)).all()  # exp(50) is fine


def test_centering_applies_the_deferred_update_one_step_later() -> None:
    g = torch.Generator().manual_seed(2)
    centering = Centering(8, momentum=0.9)
    center = torch.zeros(1, 8, dtype=torch.float64)
    for step, temp in enumerate((0.04, 0.05, 0.06)):
        logits = torch.randn(6, 8, generator=g) * (step + 1)
        torch.testing.assert_close(centering.center.double(), center, atol=1e-7, rtol=0)  # c_t in use
        probs = centering.softmax(logits, temp)
        torch.testing.assert_close(probs.double(), torch.softmax((logits.double() - center) / temp, -1),
                                   atol=1e-5, rtol=0)
        centering.update([logits])
        center = 0.9 * center + 0.1 * logits.double().mean(0, keepdim=True)  # c_{t+1}
    torch.testing.assert_close(centering.center.double(), center, atol=1e-6, rtol=0)
    restored = Centering(8)
    restored.load_state_dict(centering.state_dict())
    assert torch.equal(restored.center, centering.center)


def test_centering_statistic_over_micro_batches_is_the_effective_batch_mean() -> None:
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(4, 5, generator=g) for _ in range(3)]
    a, b = Centering(5), Centering(5)
    a.update(parts)
    b.update([torch.cat(parts)])
    torch.testing.assert_close(a.center, b.center)


def test_ibot_centering_ignores_a_step_without_masked_tokens() -> None:
    centering = Centering(4, shape_prefix=(1, 1), reduction="mean_of_rank_means")
    centering.update([torch.ones(3, 4)])
    before = centering.center.clone()
    centering.update([torch.zeros(0, 4)])  # the official mean of zero rows would be NaN forever after
    assert centering.center.shape == (1, 1, 4) and torch.equal(centering.center, before)


def test_dino_loss_equals_the_sum_over_cross_view_pairs() -> None:
    g = torch.Generator().manual_seed(4)
    batch, k, n_local = 3, 12, 4
    teacher_nat = torch.softmax(torch.randn(2 * batch, k, generator=g), -1)  # natural order [crop0; crop1]
    probs = swap_global_crops(teacher_nat).view(2, batch, k)
    s_global = torch.randn(2 * batch, k, generator=g)
    s_local = torch.randn(n_local * batch, k, generator=g)
    t0, t1 = teacher_nat[:batch], teacher_nat[batch:]
    local = sum(_ce64(t, s_local[j * batch:(j + 1) * batch]).mean() for j in range(n_local) for t in (t0, t1))
    cross = _ce64(t1, s_global[:batch]).mean() + _ce64(t0, s_global[batch:]).mean()  # no same-view pairs
    terms = 2 + 2 * n_local
    assert n_loss_terms(n_local) == terms
    ours_local = dino_local_loss(s_local, probs, n_local_crops=n_local)
    ours_global = dino_global_loss(s_global, probs, n_local_crops=n_local)
    assert ours_local.item() == pytest.approx((local / terms).item(), rel=1e-6)
    assert ours_global.item() == pytest.approx((cross / terms).item(), rel=1e-6)


def test_dino_normaliser_without_local_crops_is_three() -> None:
    assert n_loss_terms(0) == 3  # official quirk: 2 + max(0, 1)
    probs = torch.full((2, 2, 4), 0.25)
    value = dino_global_loss(torch.zeros(4, 4), probs, n_local_crops=0).item()
    assert value == pytest.approx(2 * math.log(4) / 3, rel=1e-6)


def test_ibot_loss_is_the_mean_over_all_crops_of_per_crop_means() -> None:
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(6, 9, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[3, [0]] = True
    masks[4, :7] = True  # crops 1, 2, 5 stay unmasked and still count in the denominator
    stats = mask_statistics(masks)
    m = stats["n_masked_patches"]
    teacher = torch.softmax(torch.randn(m, 7, generator=g), -1)
    student = torch.randn(m, 7, generator=g)
    ce = _ce64(teacher, student)
    crop_of_token = stats["mask_indices"] // 9
    per_crop = [ce[crop_of_token == c].mean() if (crop_of_token == c).any() else torch.tensor(0.0) for c in range(6)]
    expected = torch.stack([x.double() for x in per_crop]).mean()
    ours = ibot_masked_loss(student, teacher, stats["masks_weight"], n_global_crops_total=6)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_koleo_matches_brute_force_nearest_neighbours() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    xn = x / x.norm(dim=-1, keepdim=True)
    dist = torch.cdist(xn, xn) + torch.diag(torch.full((10,), float("inf"), dtype=torch.float64))
    nn_index = dist.argmin(1)
    expected = -torch.log((xn - xn[nn_index] + 1e-8).norm(dim=-1) + 1e-8).mean()
    ours, index = koleo_loss(x.float(), return_index=True)
    assert torch.equal(index, nn_index)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_koleo_duplicate_rows_use_epsilon_on_the_difference_vector() -> None:
    x = torch.randn(4, 9)
    x[1] = x[0]
    _, index = koleo_loss(x, return_index=True)
    assert index[0].item() == 1 and index[1].item() == 0
    # d = ||0 + eps||_2 = sqrt(D) * eps, so those rows contribute -log(3e-8 + 1e-8).
    per_row = -torch.log(torch.nn.functional.pairwise_distance(x[:1] * 0, x[:1] * 0, eps=1e-8) + 1e-8)
    assert per_row.item() == pytest.approx(-math.log(3e-8 + 1e-8), rel=1e-4)


# ---------------------------------------------------------------------------------------------- 2 gloo ranks
def _rank_worker(rank: int, init_file: str, out_file: str, rows: list[torch.Tensor], patches: list[torch.Tensor]):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pooled = Centering(rows[rank].shape[1])
        pooled.update([rows[rank]])
        rank_means = Centering(patches[rank].shape[1], shape_prefix=(1, 1), reduction="mean_of_rank_means")
        rank_means.update([patches[rank]])
        from dinoforge.pretrain.losses.reduce import global_count

        total = global_count(patches[rank].shape[0])
        out = {"pooled": pooled.center, "rank_means": rank_means.center, "total": total,
               "dino_sk": sinkhorn_knopp(rows[rank], 0.1),
               "ibot_sk": sinkhorn_knopp(patches[rank], 0.1, total_samples=total)}
        torch.save(out, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_rank_statistics_follow_the_official_semantics(tmp_path) -> None:
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(4, 6, generator=g) for _ in range(2)]  # equal rows per rank (2B each)
    patches = [torch.randn(3, 5, generator=g), torch.randn(8, 5, generator=g)]  # unequal masked counts
    out_file = str(tmp_path / "out")
    # fork: the children reuse the imported modules (spawn would re-import torch, ~10 s on 2 busy cores).
    mp.start_processes(_rank_worker, args=(str(tmp_path / "init"), out_file, rows, patches), nprocs=2, join=True,
                       start_method="fork")
    results = [torch.load(f"{out_file}.{r}", weights_only=True) for r in range(2)]
    all_rows, all_patches = torch.cat(rows), torch.cat(patches)
    for r, res in enumerate(results):
        # DINO: pooled mean over every row of every rank; iBOT: unweighted mean of the two rank means.
        torch.testing.assert_close(res["pooled"], 0.1 * all_rows.mean(0, keepdim=True))
        torch.testing.assert_close(res["rank_means"].view(1, -1),
                                   0.1 * (patches[0].mean(0) + patches[1].mean(0)).unsqueeze(0) / 2)
        assert res["total"] == 11
        # Sinkhorn over ranks == Sinkhorn of the concatenated batch, rows of this rank.
        lo = 4 * r
        torch.testing.assert_close(res["dino_sk"], sinkhorn_knopp(all_rows, 0.1)[lo:lo + 4])
        plo = 0 if r == 0 else 3
        torch.testing.assert_close(res["ibot_sk"], sinkhorn_knopp(all_patches, 0.1)[plo:plo + len(patches[r])])
