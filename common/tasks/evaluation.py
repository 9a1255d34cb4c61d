"""The held-out evaluation every mode and benchmark scores a model with (conf/eval/default.yaml says what it holds).

- Judged pairs: accuracy, macro-F1, per-class precision/recall, confusion matrix, nDCG@10 over each query's pairs.
- The catalog (built-in marketplace): the bi-encoder retrieves eval.catalog_top_n products for every test query and
  the model re-ranks them by expected gain, as the service does; scored against the judgement of every product.
- Hard queries (built-in marketplace, full evaluations only): the share whose exact product the model ranks first.

Each round scores a fixed subset of eval.round_queries queries; `full=True` scores all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from transformers import PreTrainedTokenizerBase

from common.run import keys
from common.run.config import FedshopConfig
from common.tasks import data as D
from common.tasks import model as M
from common.tasks import synthetic
from common.tasks import train as T
from common.tasks.encoder import Encoder, retriever_path
from common.tasks.metrics import catalog_ranking, classification_report, confusion, expected_gain, per_class

log = logging.getLogger(__name__)


@dataclass
class References:
    """A judged catalog's judgements and its reference rankers, computed once per run."""

    titles: list[str]
    retrieved: list[list[int]]  # the reference bi-encoder's top catalog_top_n of every query, best first
    gains: np.ndarray  # (queries, products): the judged gain of every catalog product
    exact: np.ndarray  # (queries, products): judged exact
    baselines: dict[str, dict[str, Any]]  # retrieval alone and keyword, on every query


def references(cfg: FedshopConfig, judged: synthetic.JudgedSet, labels: list[str], gains: list[float]) -> References:
    """The catalog's judgements, the bi-encoder's retrieval (eval.retriever) and keyword TF-IDF, both scored."""
    t0 = time.perf_counter()
    titles = [p["title"] for p in judged.catalog]
    encoder = Encoder(retriever_path(cfg.eval.retriever or cfg.serving.retriever), cfg.train.max_length)
    retrieved = top_k(encoder.encode(judged.queries) @ encoder.encode(titles).T, cfg.eval.catalog_top_n)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(titles)  # keyword: the catalog's words
    gain_of = dict(zip(labels, gains, strict=True))
    g = np.array([[gain_of[x] for x in row] for row in judged.judgements])
    exact = np.array([[x == synthetic.ESCI_LABELS[0] for x in row] for row in judged.judgements])
    keyword = top_k((vec.transform(judged.queries) @ vec.transform(titles).T).toarray(), 10)
    baselines: dict[str, dict[str, Any]] = {
        "retrieval": {**catalog_ranking(retrieved, g, exact), **hard_first(judged, _cosine(encoder))},
        "keyword": {**catalog_ranking(keyword, g, exact), **hard_first(judged, _tfidf(vec))}}
    shown = {k: {m: round(v, 4) for m, v in b.items() if isinstance(v, float)} for k, b in baselines.items()}
    log.info("catalog evaluation: %d products, top %d of %d queries retrieved in %.1fs; retrieval alone %s; "
             "keyword %s", len(titles), len(retrieved[0]), len(judged.queries), time.perf_counter() - t0,
             shown["retrieval"], shown["keyword"])
    return References(titles, retrieved, g, exact, baselines)


@dataclass
class _Catalog:
    """The references, and every test query's retrieved candidates as tokenised (query, product) pairs."""

    refs: References
    pairs: datasets.Dataset  # one row per (query, retrieved product), query-major

    @property
    def retrieved(self) -> list[list[int]]:
        """The reference retrieval of every query."""
        return self.refs.retrieved

    @property
    def gains(self) -> np.ndarray:
        """Judged gains, (queries, products)."""
        return self.refs.gains

    @property
    def exact(self) -> np.ndarray:
        """Judged exact, (queries, products)."""
        return self.refs.exact


def _pairs(queries: list[str], titles: list[str], tokenizer: PreTrainedTokenizerBase,
           max_length: int) -> datasets.Dataset:
    """Tokenised (queries[i], titles[i]) pairs, labelled 0 (the labels are not used)."""
    rows = [{"text": q, "text_pair": t, "label": 0} for q, t in zip(queries, titles, strict=True)]
    return M.tokenize(datasets.Dataset.from_list(rows), tokenizer, max_length)


PairScorer = Callable[[list[str], list[str]], np.ndarray]


def _cosine(encoder: Encoder) -> PairScorer:
    """The bi-encoder's cosine of (query, title) pairs."""
    return lambda queries, titles: (encoder.encode(queries) * encoder.encode(titles)).sum(axis=1)


def _tfidf(vec: TfidfVectorizer) -> PairScorer:
    """A fitted TF-IDF vectorizer's cosine of (query, title) pairs."""
    return lambda queries, titles: np.asarray(vec.transform(queries).multiply(vec.transform(titles)).sum(axis=1)
                                              ).ravel()


def top_k(sims: np.ndarray, k: int) -> list[list[int]]:
    """The k highest-scoring catalog indices of every row, best first (ties in catalog order)."""
    return np.argsort(-sims, axis=1, kind="stable")[:, :k].tolist()


class Evaluation:
    """The held-out test set of a run, tokenised once, with the catalog's retrieval done once."""

    def __init__(self, cfg: FedshopConfig, test_raw: datasets.Dataset, labels: list[str],
                 tokenizer: PreTrainedTokenizerBase, judged: synthetic.JudgedSet | None,
                 gains: list[float] | None) -> None:
        self.cfg, self.labels, self.tokenizer, self.judged, self.gains = cfg, labels, tokenizer, judged, gains
        self.pairs = M.tokenize(test_raw, tokenizer, cfg.train.max_length, cfg.data.num_proc)
        self.num_examples = len(self.pairs)
        query_ids = list(dict.fromkeys(self.pairs["query_id"]))
        self.num_queries = len(query_ids)
        n = cfg.eval.round_queries
        chosen = None if n is None or n >= len(query_ids) else set(
            sorted(query_ids, key=lambda q: D.unit_hash(cfg.seed, "eval-round", q))[:n])
        self.round_queries = [i for i, q in enumerate(query_ids) if chosen is None or q in chosen]
        self.round_pairs = self.pairs if chosen is None else self.pairs.select(
            [i for i, q in enumerate(self.pairs["query_id"]) if q in chosen])
        self._catalog: _Catalog | None = None

    def describe(self) -> dict[str, Any]:
        """results.json's `evaluation`: what is scored, per round and at the end."""
        out: dict[str, Any] = {"test_examples": len(self.pairs), "test_queries": self.num_queries,
                               "round_examples": len(self.round_pairs), "round_queries": len(self.round_queries),
                               "per_round": "subset" if len(self.round_pairs) < len(self.pairs) else "full",
                               "final": "full"}
        if self.judged is not None:
            out.update(catalog_products=len(self.judged.catalog), catalog_top_n=self.cfg.eval.catalog_top_n,
                       hard_queries=len(self.judged.hard))
        return out

    @property
    def _gains(self) -> list[float]:
        assert self.gains is not None  # a judged catalog exists for task=relevance only
        return self.gains

    def catalog(self) -> _Catalog | None:
        """The catalog's retrieval and judgements (computed on first use; None without a judged catalog)."""
        if self.judged is None or self._catalog is not None:
            return self._catalog
        j, refs = self.judged, references(self.cfg, self.judged, self.labels, self._gains)
        pairs = _pairs([q for q, r in zip(j.queries, refs.retrieved, strict=True) for _ in r],
                       [refs.titles[i] for r in refs.retrieved for i in r], self.tokenizer, self.cfg.train.max_length)
        self._catalog = _Catalog(refs, pairs)
        return self._catalog

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Retrieval alone and TF-IDF keyword ranking of the catalog, and their hard-query shares ({} without)."""
        cat = self.catalog()
        return {} if cat is None else cat.refs.baselines

    def _model_scores(self, model: torch.nn.Module) -> PairScorer:
        """The model's expected gain of (query, title) pairs."""
        def score(queries: list[str], titles: list[str]) -> np.ndarray:
            ds = _pairs(queries, titles, self.tokenizer, self.cfg.train.max_length)
            return expected_gain(T.predict(model, ds, self.tokenizer, self.cfg.train)[0], self._gains)
        return score

    def __call__(self, model: torch.nn.Module, full: bool) -> dict[str, Any]:
        """The model's metrics on the round subset, or (full) on the whole test set with the hard queries."""
        ds = self.pairs if full else self.round_pairs
        probs, loss = T.predict(model, ds, self.tokenizer, self.cfg.train)
        y, pred = ds["label"], probs.argmax(axis=1).tolist()
        classes = per_class(y, pred, self.labels)
        out: dict[str, Any] = {
            "loss": loss, **classification_report(y, probs, len(self.labels), ds["query_id"], self.gains),
            keys.NUM_EXAMPLES: len(ds), "eval": "full" if full or ds is self.pairs else "subset",
            "recall": {k: v["recall"] for k, v in classes.items()},
            "precision": {k: v["precision"] for k, v in classes.items()},
            "confusion": confusion(y, pred, len(self.labels))}
        cat = self.catalog()
        if cat is not None and self.judged is not None:
            out.update(self._rerank(model, cat, list(range(self.num_queries)) if full else self.round_queries))
            if full:
                out.update(hard_first(self.judged, self._model_scores(model)))
        return out

    def _rerank(self, model: torch.nn.Module, cat: _Catalog, queries: list[int]) -> dict[str, float]:
        """Catalog metrics of the model's re-ranking of the retrieved candidates of `queries`."""
        k = len(cat.retrieved[0])  # catalog_top_n, or the whole catalog when it is smaller
        rows = [q * k + i for q in queries for i in range(k)]
        probs, _ = T.predict(model, cat.pairs.select(rows), self.tokenizer, self.cfg.train)
        scores = expected_gain(probs, self._gains).reshape(len(queries), -1)
        ranked = [[cat.retrieved[q][i] for i in np.argsort(-s, kind="stable")] for q, s in zip(queries, scores,
                                                                                               strict=True)]
        return catalog_ranking(ranked, cat.gains[queries], cat.exact[queries])


def hard_first_share(scored: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """`hard_first`: the share of hard queries whose exact product (index 0) scores strictly highest, overall and
    per kind (`hard_first_by_kind`)."""
    firsts: dict[str, list[bool]] = {}
    for kind, s in scored:
        firsts.setdefault(kind, []).append(bool(s[0] > s[1:].max()))
    every = [f for v in firsts.values() for f in v]
    return {"hard_first": float(np.mean(every)) if every else 0.0,
            "hard_first_by_kind": {k: float(np.mean(v)) for k, v in firsts.items()}}


def hard_first(judged: synthetic.JudgedSet, score: PairScorer) -> dict[str, Any]:
    """hard_first shares of a pair scorer over the judged set's hard queries."""
    titles = [h["titles"] for h in judged.hard]
    flat = score([h["query"] for h, ts in zip(judged.hard, titles, strict=True) for _ in ts],
                 [t for ts in titles for t in ts])
    edges = np.cumsum([0] + [len(t) for t in titles])
    return hard_first_share([(h["kind"], flat[a:b]) for h, a, b in zip(judged.hard, edges[:-1], edges[1:],
                                                                        strict=True)])
