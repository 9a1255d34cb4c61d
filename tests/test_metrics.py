"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.tasks.metrics import (
    accuracy,
    catalog_ranking,
    classification_report,
    confusion,
    expected_gain,
    macro_f1,
    ndcg_at_k,
    per_class,
)


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


def test_per_class_precision_recall_and_confusion():
    y, p = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    got = per_class(y, p, ["a", "b", "c"])
    assert got["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert got["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert got["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert confusion(y, p, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_catalog_ranking_against_the_whole_catalog():
    """nDCG's ideal comes from every product, not only the ranked ones; MRR and recall count exact products."""
    gains = np.array([[1.0, 0.1, 0.0, 1.0], [0.0, 0.0, 0.1, 0.0]])
    exact = gains == 1.0
    got = catalog_ranking([[1, 0], [2, 3]], gains, exact, k=2)
    ideal = 1.0 + 1.0 / math.log2(3)
    assert got["catalog_ndcg@2"] == pytest.approx(((0.1 + 1.0 / math.log2(3)) / ideal + 1.0) / 2)
    assert got["catalog_mrr"] == pytest.approx((1 / 2 + 0.0) / 2)
    assert got["catalog_recall@2"] == pytest.approx(0.5)  # only query 0 has exact products: 1 of its 2
