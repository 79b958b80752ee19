"""k-NN against a brute-force float64 reference and the official softmax formulation; retrieval against
brute force."""

from __future__ import annotations

import math

import pytest
import torch

from dinoforge.core.errors import DataError
from dinoforge.core.eval import knn_class_scores, knn_classify, retrieval_recall


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def _clustered(n: int, dim: int, classes: int, seed: int, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def brute_force_scores(train_x, train_y, test_x, ks, temperature, classes):
    """Per query: every cosine similarity in float64, sort, sum exp(sim/T) votes of the k best."""
    out = {k: torch.zeros(len(test_x), classes, dtype=torch.float64) for k in ks}
    train = train_x.double()
    train = train / train.norm(dim=1, keepdim=True)
    for i, q in enumerate(test_x.double()):
        sims = (train @ (q / q.norm())).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        for k in ks:
            for j in order[:k]:
                out[k][i, int(train_y[j])] += math.exp(sims[j] / temperature)
    return out


def test_scores_match_brute_force() -> None:
    train_x, train_y = _clustered(300, 16, 7, seed=0)
    test_x, _ = _clustered(40, 16, 7, seed=1)
    ks = (1, 5, 20, 100)
    scores = knn_class_scores(train_x, train_y, test_x, ks=ks, temperature=0.07, num_classes=7, chunk_size=13)
    ref = brute_force_scores(train_x, train_y, test_x, ks, 0.07, 7)
    for k in ks:
        torch.testing.assert_close(scores[k].double(), ref[k], rtol=2e-5, atol=0)


def test_accuracy_matches_brute_force_and_official_softmax_form() -> None:
    train_x, train_y = _clustered(500, 12, 10, seed=2)
    test_x, test_y = _clustered(120, 12, 10, seed=3)
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20, 100, 200), chunk_size=32)
    refs = brute_force_scores(train_x, train_y, test_x, (10, 20, 100, 200), 0.07, 10)
    for k, ref in refs.items():
        top5 = ref.topk(5, dim=1).indices
        assert res.top1[k] == pytest.approx(100 * (top5[:, 0] == test_y).double().mean().item())
        assert res.top5[k] == pytest.approx(100 * (top5 == test_y[:, None]).any(1).double().mean().item())
    # Official form: softmax over the max(k) similarities before summing: same rankings, same accuracy.
    train_n = torch.nn.functional.normalize(train_x, dim=1)
    sims, idx = (torch.nn.functional.normalize(test_x, dim=1) @ train_n.T).topk(200, dim=1)
    probs = torch.softmax(sims / 0.07, dim=1)
    onehot = torch.nn.functional.one_hot(train_y[idx], 10).float()  # [M, 200, C]
    for k in (10, 20, 100, 200):
        official = (onehot[:, :k] * probs[:, :k, None]).sum(1)
        assert res.top1[k] == pytest.approx(100 * (official.argmax(1) == test_y).float().mean().item())
    assert res.n_train == 500 and res.n_test == 120 and res.num_classes == 10


def test_chunking_does_not_change_results() -> None:
    train_x, train_y = _clustered(400, 8, 5, seed=4, spread=3.0)
    test_x, test_y = _clustered(90, 8, 5, seed=5, spread=3.0)
    a = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20), chunk_size=1)
    b = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20), chunk_size=1000)
    assert a.top1 == b.top1 and a.top5 == b.top5
    assert 20 < a.top1[10] < 100  # neither trivial nor broken at this spread


def test_k_clamped_and_bad_labels() -> None:
    train_x, train_y = _clustered(30, 4, 3, seed=6)
    test_x, test_y = _clustered(10, 4, 3, seed=7)
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 200))
    assert res.k_used == {10: 10, 200: 30}
    assert res.to_dict()["k_used"] == {"10": 10, "200": 30}
    unlabelled = test_y.clone()
    unlabelled[0] = -1
    with pytest.raises(DataError, match="1 of 10 test samples have none"):
        knn_classify(train_x, train_y, test_x, unlabelled)
    with pytest.raises(DataError, match="num_classes=2"):
        knn_classify(train_x, train_y, test_x, test_y, num_classes=2)
    with pytest.raises(DataError, match="features"):
        knn_classify(train_x, train_y, test_x[:, :2], test_y)


@pytest.mark.parametrize("temperature", [0.0, -0.07, float("nan")])
def test_non_positive_vote_temperature_is_an_error(temperature: float) -> None:
    train_x, train_y = _clustered(30, 4, 3, seed=6)
    test_x, test_y = _clustered(10, 4, 3, seed=7)
    with pytest.raises(DataError, match="temperature must be positive"):
        knn_classify(train_x, train_y, test_x, test_y, temperature=temperature)
    with pytest.raises(DataError, match="temperature must be positive"):
        knn_class_scores(train_x, train_y, test_x, temperature=temperature)


def _brute_recall(q, g, qk, gk, k, qids=None, gids=None):
    """Per query: float64 cosine to every allowed gallery item, sort, look for a relevant key in the top k."""
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    gn = g.double() / g.double().norm(dim=1, keepdim=True)
    sims = (qn @ gn.T).tolist()
    hits = 0
    for i, row in enumerate(sims):
        ranked = sorted((s, j) for j, s in enumerate(row) if qids is None or qids[i] != gids[j])
        hits += any(gk[j] == qk[i] for _, j in ranked[::-1][:k])
    return 100.0 * hits / len(q)


def test_retrieval_recall_matches_brute_force() -> None:
    x, y = _clustered(80, 6, 6, seed=8, spread=2.0)
    q, qy = _clustered(25, 6, 6, seed=9, spread=2.0)
    res = retrieval_recall(q, x, qy, y, ks=(1, 5, 10), chunk_size=7)
    for k in (1, 5, 10):
        assert res.recall[k] == pytest.approx(_brute_recall(q, x, qy, y, k))
    # A set against itself: each item's own entry is excluded when ids are given.
    ids = [f"img{i}" for i in range(len(x))]
    self_res = retrieval_recall(x, x, y.tolist(), y.tolist(), ks=(1, 3), query_ids=ids, gallery_ids=ids)
    for k in (1, 3):
        assert self_res.recall[k] == pytest.approx(_brute_recall(x, x, y, y, k, ids, ids))
    # Relevance by id: copies of the gallery with noise find their original.
    noisy = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert retrieval_recall(noisy, x, ids, ids, ks=(1,)).recall[1] == 100.0
