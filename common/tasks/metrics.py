"""Classification and ranking metrics: accuracy, macro-F1, nDCG@k grouped by query."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact label matches."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else 0.0


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean F1 over the labels that occur in y_true or y_pred."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for k in range(num_labels):
        tp = int(((t == k) & (p == k)).sum())
        fp = int(((t != k) & (p == k)).sum())
        fn = int(((t == k) & (p != k)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def ndcg_at_k(query_ids: Sequence[str], scores: Sequence[float], gains: Sequence[float], k: int = 10) -> float:
    """Mean nDCG@k over queries, ranking each query's items by score (linear gains, log2 discount).

    Queries whose ideal DCG is 0 (no relevant item) are skipped; ties keep input order.
    """
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for q, s, g in zip(query_ids, scores, gains, strict=True):
        groups[q].append((float(s), float(g)))
    values = []
    for items in groups.values():
        ranked = sorted(range(len(items)), key=lambda i: -items[i][0])[:k]
        dcg = sum(items[i][1] / math.log2(r + 2) for r, i in enumerate(ranked))
        ideal = sorted((g for _, g in items), reverse=True)[:k]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        if idcg > 0:
            values.append(dcg / idcg)
    return float(np.mean(values)) if values else 0.0


def expected_gain(probs: np.ndarray, label_gains: Sequence[float]) -> np.ndarray:
    """Ranking score per example: Σ_label p(label) · gain(label)."""
    return probs @ np.asarray(label_gains, dtype=np.float64)


def classification_report(y_true: Sequence[int], probs: np.ndarray, num_labels: int,
                          query_ids: Sequence[str] | None = None,
                          label_gains: Sequence[float] | None = None) -> dict[str, float]:
    """accuracy, macro_f1 and (when label gains are given) ndcg@10 from predicted probabilities."""
    pred = probs.argmax(axis=1).tolist()
    out = {"accuracy": accuracy(y_true, pred), "macro_f1": macro_f1(y_true, pred, num_labels)}
    if label_gains is not None and query_ids is not None:
        scores = expected_gain(probs, label_gains)
        true_gains = [label_gains[y] for y in y_true]
        out["ndcg@10"] = ndcg_at_k(query_ids, scores.tolist(), true_gains, 10)
    return out


def per_class(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every label (0.0 where a label is never predicted or never true)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    out = {}
    for k, name in enumerate(labels):
        tp = int(((t == k) & (p == k)).sum())
        predicted, actual = int((p == k).sum()), int((t == k).sum())
        out[name] = {"precision": tp / predicted if predicted else 0.0, "recall": tp / actual if actual else 0.0,
                     "f1": 2 * tp / (predicted + actual) if predicted + actual else 0.0, "support": actual}
    return out


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """Counts, one row per true label and one column per predicted label."""
    m = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m.tolist()


def catalog_ranking(ranked: Sequence[Sequence[int]], gains: np.ndarray, exact: np.ndarray,
                    k: int = 10) -> dict[str, float]:
    """nDCG@k, MRR and recall@k of one ranked list of catalog indices per query, against the judgement of every
    catalog product (gains and exact: one row per query, one column per product). nDCG's ideal is the best k of
    the whole catalog; MRR is the first exact product's reciprocal rank (0 when none is ranked); recall@k is the
    share of the query's exact products in its top k, out of at most k."""
    ndcg, mrr, recall = [], [], []
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    for q, order in enumerate(ranked):
        top = np.asarray(order[:k], dtype=np.int64)
        ideal = np.sort(gains[q])[::-1][:k]
        idcg = float((ideal * discount[:len(ideal)]).sum())
        if idcg == 0:
            continue
        ndcg.append(float((gains[q][top] * discount[:len(top)]).sum()) / idcg)
        hits = np.flatnonzero(exact[q][np.asarray(order, dtype=np.int64)])
        mrr.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
        relevant = int(exact[q].sum())
        if relevant:
            recall.append(int(exact[q][top].sum()) / min(k, relevant))
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return {f"catalog_ndcg@{k}": mean(ndcg), "catalog_mrr": mean(mrr), f"catalog_recall@{k}": mean(recall)}
