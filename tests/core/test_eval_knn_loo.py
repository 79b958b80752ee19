"""Leave-one-out k-NN (small labelled sets without a split, e.g. the tuxpaint protocol)."""

from __future__ import annotations

import pytest
import torch

from dinoforge.core.errors import DataError
from dinoforge.core.eval.knn import knn_classify


def test_leave_one_out_never_counts_a_sample_as_its_own_neighbour() -> None:
    # two tight clusters of class 0 and 1, plus one class-1 point sitting inside cluster 0
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0], [0.1, 0.99], [0.995, 0.05]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    with_self = knn_classify(x, y, x, y, ks=[1], temperature=0.07)
    loo = knn_classify(x, y, x, y, ks=[1, 20], temperature=0.07, leave_one_out=True)
    assert with_self.top1[1] == 100.0  # each point is its own nearest neighbour
    assert loo.top1[1] < 100.0  # the stray class-1 point, at least, is now judged by its neighbours
    assert loo.k_used[20] == 5  # at most the N - 1 others
    for k in (1, 20):  # the same as classifying each point against a bank without it
        brute = []
        for i in range(len(x)):
            keep = torch.arange(len(x)) != i
            brute.append(knn_classify(x[keep], y[keep], x[i:i + 1], y[i:i + 1], ks=[k], temperature=0.07).top1[k])
        assert loo.top1[k] == pytest.approx(sum(brute) / len(brute))


def test_leave_one_out_needs_the_same_set() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(DataError, match="leave-one-out"):
        knn_classify(x, y, x[:2], y[:2], ks=[1], leave_one_out=True)
