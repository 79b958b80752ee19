"""DISC21-style micro AP and recall at precision, on rankings worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dinoforge.curate.copyeval import evaluate, micro_ap, recall_at_precision


def test_perfect_ranking_scores_one() -> None:
    score = np.array([0.9, 0.8, 0.1])
    correct = np.array([True, True, False])
    assert micro_ap(score, correct, 2) == 1.0
    assert recall_at_precision(score, correct, 2) == 1.0


def test_false_positive_on_top_and_missed_query() -> None:
    # ranking: wrong, right, right; a third query with an original was never matched
    score = np.array([0.9, 0.8, 0.7])
    correct = np.array([False, True, True])
    assert micro_ap(score, correct, 3) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert recall_at_precision(score, correct, 3, 0.9) == 0.0
    assert recall_at_precision(score, correct, 3, 0.6) == pytest.approx(2 / 3)


def test_ties_count_against_the_method() -> None:
    score = np.array([0.5, 0.5])
    assert micro_ap(score, np.array([True, False]), 1) == 0.5


def test_evaluate_with_distractor_and_families() -> None:
    # 3 queries x 2 references: q0 -> r0 (crop), q1 -> r1 (jpeg), q2 is a distractor (crop)
    scores = np.array([[0.9, 0.1], [0.2, 0.6], [0.7, 0.3]])
    out = evaluate(scores, np.array([0, 1, -1]), ["crop", "jpeg", "crop"], k=1)
    # global ranking: q0-r0 right (0.9), q2-r0 wrong (0.7), q1-r1 right (0.6)
    assert out["overall"]["muap"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["overall"]["recall_at_p90"] == 0.5
    assert out["families"]["crop"] == {"muap": 1.0, "recall_at_p90": 1.0, "queries": 2, "with_original": 1}
    assert out["families"]["jpeg"]["muap"] == 1.0
