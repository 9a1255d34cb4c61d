"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics import accuracy, classification_report, expected_gain, macro_f1, ndcg_at_k


def test_accuracy_and_macro_f1():
    y, p = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert accuracy(y, p) == pytest.approx(3 / 5)
    # F1 per class: 0: tp1 fp1 fn1 -> 0.5 ; 1: tp2 fp1 fn0 -> 0.8 ; 2: tp0 fp0 fn1 -> 0
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_ndcg_perfect_and_reversed():
    q = ["a", "a", "a"]
    gains = [1.0, 0.1, 0.0]
    assert ndcg_at_k(q, [3, 2, 1], gains) == pytest.approx(1.0)
    dcg = 0.0 / math.log2(2) + 0.1 / math.log2(3) + 1.0 / math.log2(4)
    idcg = 1.0 / math.log2(2) + 0.1 / math.log2(3)
    assert ndcg_at_k(q, [1, 2, 3], gains) == pytest.approx(dcg / idcg)


def test_ndcg_groups_by_query_and_skips_queries_without_relevant_items():
    q = ["a", "a", "b", "b", "c"]
    scores = [1, 0, 0, 1, 5]
    gains = [1.0, 0.0, 1.0, 0.0, 0.0]
    expected = (1.0 + (1 / math.log2(3)) / 1.0) / 2  # "c" has no relevant item
    assert ndcg_at_k(q, scores, gains) == pytest.approx(expected)


def test_ndcg_cuts_at_k():
    q = ["a"] * 12
    gains = [0.0] * 11 + [1.0]
    scores = list(range(12, 0, -1))  # the only relevant item ranked 12th
    assert ndcg_at_k(q, scores, gains, k=10) == 0.0


def test_report_uses_expected_gain_for_ranking():
    probs = np.array([[0.9, 0.1, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7]])
    assert expected_gain(probs, [1, 0.1, 0.01, 0]).tolist() == pytest.approx([0.91, 0.111])
    rep = classification_report([0, 3], probs, 4, ["q", "q"], [1, 0.1, 0.01, 0])
    assert rep == {"accuracy": 1.0, "macro_f1": 1.0, "ndcg@10": pytest.approx(1.0)}
