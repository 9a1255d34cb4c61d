"""Keyword baseline for relevance: TF-IDF cosine between query and product text.

Ranking uses the cosine directly. Classification bins the cosine into quantiles fitted on the train
split and predicts each bin's most frequent train label.
"""

from __future__ import annotations

import datasets
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from common.tasks.metrics import accuracy, macro_f1, ndcg_at_k


class KeywordBaseline:
    """TF-IDF (word 1-2 grams) cosine similarity with quantile-binned label assignment."""

    def __init__(self, num_labels: int, bins: int = 10) -> None:
        self.num_labels = num_labels
        self.bins = bins
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
        self.edges = np.zeros(0)
        self.bin_label = np.zeros(0, dtype=int)

    def score(self, ds: datasets.Dataset) -> np.ndarray:
        """Cosine similarity of TF-IDF vectors of text and text_pair, one per example."""
        a = self.vectorizer.transform(ds["text"])
        b = self.vectorizer.transform(ds["text_pair"])
        return np.asarray(a.multiply(b).sum(axis=1)).ravel()

    def fit(self, train: datasets.Dataset) -> KeywordBaseline:
        """Fit the vocabulary and the score-bin -> label map on the train split."""
        self.vectorizer.fit(list(train["text"]) + list(train["text_pair"]))
        s = self.score(train)
        self.edges = np.unique(np.quantile(s, np.linspace(0, 1, self.bins + 1)[1:-1]))
        bins = np.searchsorted(self.edges, s, side="right")
        labels = np.asarray(train["label"])
        majority = int(np.bincount(labels, minlength=self.num_labels).argmax())
        self.bin_label = np.array([
            int(np.bincount(labels[bins == b], minlength=self.num_labels).argmax()) if (bins == b).any()
            else majority for b in range(len(self.edges) + 1)])
        return self

    def evaluate(self, ds: datasets.Dataset, label_gains: list[float]) -> dict[str, float]:
        """accuracy, macro_f1 and ndcg@10 on a split."""
        s = self.score(ds)
        pred = self.bin_label[np.searchsorted(self.edges, s, side="right")].tolist()
        y = list(ds["label"])
        gains = [label_gains[t] for t in y]
        return {"accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred, self.num_labels),
                "ndcg@10": ndcg_at_k(ds["query_id"], s.tolist(), gains, 10)}
