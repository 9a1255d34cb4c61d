"""The held-out evaluation (common/tasks/evaluation.py): round subset vs full, catalog re-ranking, hard queries."""

from __future__ import annotations

import numpy as np
import pytest

from common.run.config import compose
from common.tasks import data as D
from common.tasks import evaluation as E
from common.tasks import model as M
from common.tasks.metrics import catalog_ranking
from common.tasks.registry import get_task

SMALL = ["task=relevance", "model=tiny", "finetune=full", "train.progress=false", "simulation.num_merchants=3",
         "data.synthetic.num_queries=40", "data.synthetic.test_queries=30", "data.synthetic.hard_queries=10",
         "eval.round_queries=8", "eval.catalog_top_n=10"]


@pytest.fixture(scope="module")
def setup():
    cfg = compose(SMALL)
    fd = D.prepare(cfg)
    wb = get_task(cfg).workbench(fd.labels)
    ev = wb.task.evaluation(wb, fd.test)
    assert isinstance(ev, E.Evaluation)
    return cfg, fd, wb.tokenizer, ev


def test_rounds_score_a_fixed_subset_and_the_end_scores_everything(setup):
    cfg, fd, _, ev = setup
    model = M.build_model(cfg.model, fd.labels, cfg.seed, cfg.finetune)
    described = ev.describe()
    assert described["test_queries"] == len(set(fd.test["query_id"])) and described["round_queries"] == 8
    assert described["per_round"] == "subset" and described["catalog_top_n"] == 10
    part, again, full = ev(model, False), ev(model, False), ev(model, True)
    assert part["eval"] == "subset" and full["eval"] == "full"
    assert part["num-examples"] == len(ev.round_pairs) < full["num-examples"] == len(fd.test)
    assert part["catalog_ndcg@10"] == again["catalog_ndcg@10"]  # the same queries every round
    assert sum(map(sum, full["confusion"])) == len(fd.test)
    assert set(full["recall"]) == set(fd.labels) and "hard_first" in full and "hard_first" not in part
    assert {"retrieval", "keyword"} == set(ev.baselines())


def test_an_oracle_reranker_beats_retrieval_alone_and_ranks_every_hard_query_right(setup, monkeypatch):
    """Re-ranking by the judged labels themselves (a perfect model) can only improve on retrieval alone: this checks
    that the re-ranked scores line up with the catalog products they belong to."""
    cfg, fd, tokenizer, ev = setup
    j = ev.judged
    titles = [p["title"] for p in j.catalog]
    truth: dict[tuple[int, ...], int] = {}
    for q, query in enumerate(j.queries):
        enc = tokenizer([query] * len(titles), titles, truncation=True, max_length=cfg.train.max_length)["input_ids"]
        for p, ids in enumerate(enc):
            truth.setdefault(tuple(ids), fd.labels.index(j.judgements[q][p]))
    for h in j.hard:
        enc = tokenizer([h["query"]] * 4, h["titles"], truncation=True, max_length=cfg.train.max_length)["input_ids"]
        for i, ids in enumerate(enc):
            truth.setdefault(tuple(ids), 0 if i == 0 else fd.labels.index("substitute"))

    def oracle(model, ds, tok, train_cfg):
        labels = [truth.get(tuple(ids), len(fd.labels) - 1) for ids in ds["input_ids"]]
        return np.eye(len(fd.labels))[labels], 0.0

    monkeypatch.setattr(E.T, "predict", oracle)
    full = ev(object(), True)  # the oracle ignores the model
    cat = ev.catalog()
    assert cat is not None
    retrieval = ev.baselines()["retrieval"]
    assert full["catalog_ndcg@10"] > retrieval["catalog_ndcg@10"]
    assert full["catalog_mrr"] >= retrieval["catalog_mrr"]
    best = [sorted(r, key=lambda p: -cat.gains[q][p]) for q, r in enumerate(cat.retrieved)]
    assert full["catalog_ndcg@10"] == pytest.approx(catalog_ranking(best, cat.gains, cat.exact)["catalog_ndcg@10"])
    assert full["hard_first"] == 1.0 and full["accuracy"] == 1.0
