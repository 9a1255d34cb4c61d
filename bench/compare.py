"""Federated (non-IID merchants) vs centralized vs merchants alone vs keyword and retrieval alone, on the held-out
evaluation every run scores (common/tasks/evaluation.py): the catalog ranking, the hard queries and the judged
pairs. Same data, model and total epochs (num_rounds x local_epochs) for the three trained settings.

task=retrieval (the default, the dual encoder): each trained setting also gets a second-stage row, its top
eval.catalog_top_n re-ranked by a cross-encoder: --reranker DIR (a task=relevance run's model/), `train` (train
one here, federated, task=relevance, and report it too) or `none`. merchants alone has no single model; its
second stage uses the largest merchant's (what the alone run saves).

Rows go to bench/results/compare.json (compare_relevance.json for --task relevance) as they finish.
Usage: python bench/compare.py [--task retrieval] [--reranker train|none|DIR] [--merchants 10] [--model minilm]
       [--modes federated,centralized,alone] [overrides...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _util import run_simulation, table, write
from transformers import AutoModelForSequenceClassification

from common.run.config import compose
from common.tasks import data as D
from common.tasks.baseline import KeywordBaseline
from common.tasks.registry import get_task

PAIR = ("accuracy", "macro_f1", "ndcg@10")
CATALOG = ("catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")
LABELS = {"federated": "federated ({strategy}, {n} merchants)", "centralized": "centralized (pooled)",
          "alone": "merchants alone (weighted mean)"}
STAGE_OF = {"federated": "federated", "centralized": "centralized", "alone": "merchants alone (largest merchant)"}


def _row(setting: str, scores: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    """A compare.json row: the setting, its pair and catalog metrics, hard queries by kind."""
    return {"setting": setting, **{k: scores.get(k) for k in (*PAIR, *CATALOG)},
            "hard_first_by_kind": scores.get("hard_first_by_kind"), "seconds": seconds, **extra}


def trained_row(mode: str, out: dict[str, Any], merchants: int, encoder: bool) -> dict[str, Any]:
    """A row from one run's results.json (named "dual encoder, ..." when the task trains a retriever)."""
    res = out["results"]
    name = LABELS[mode].format(strategy=res.get("strategy", "FedAvg"), n=merchants)
    name = f"dual encoder, {name}" if encoder else name
    return _row(name, res["final"], out["wall_seconds"], mode=mode, recall=res["final"].get("recall"))


def baseline_rows(overrides: list[str], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """Keyword TF-IDF (its pair metrics and catalog ranking) and the pretrained bi-encoder's retrieval alone."""
    cfg = compose(overrides)
    fd = D.prepare(cfg)
    gains = get_task(cfg).label_gains(fd.labels)
    assert gains is not None, "the comparison needs a ranking task"
    pairs = KeywordBaseline(len(fd.labels)).fit(fd.pooled_train).evaluate(fd.test, gains)
    return [_row("keyword TF-IDF", {**pairs, **baselines["keyword"]}, 0.0),
            _row("retrieval alone (pretrained bi-encoder, round 0)", baselines["retrieval"], 0.0)]


def second_stage_row(setting: str, encoder: Path, reranker: Path, overrides: list[str]) -> dict[str, Any]:
    """The encoder's top eval.catalog_top_n re-ranked by the cross-encoder, on the same held-out catalog."""
    cfg = compose([*(o for o in overrides if not o.startswith("task=")), "task=relevance",
                   f"eval.retriever={encoder}"])
    fd = D.prepare(cfg)
    task = get_task(cfg)
    wb = task.workbench(fd.labels)
    ev = task.evaluation(wb, fd.test)
    scores = ev(AutoModelForSequenceClassification.from_pretrained(reranker), True)
    alone = ev.baselines()["retrieval"]["catalog_ndcg@10"]
    catalog = {k: v for k, v in scores.items() if k not in PAIR}  # the pair metrics would be the re-ranker's own
    return _row(f"{setting} + cross-encoder (top {cfg.eval.catalog_top_n})", catalog, 0.0,
                second_stage_gain=scores["catalog_ndcg@10"] - alone)


class Comparison:
    """The rows so far, written to bench/results/<name>.json after each one (a cut run keeps what it has)."""

    def __init__(self, name: str, overrides: list[str]) -> None:
        self.name = name
        self.doc: dict[str, Any] = {"overrides": overrides, "baselines": [], "rows": []}

    def add(self, row: dict[str, Any], where: str = "rows") -> None:
        """Record a row and rewrite the JSON."""
        self.doc[where].append(row)
        print(f"{row['setting']}: {{{', '.join(f'{k}: {v}' for k, v in row.items() if k != 'setting')}}}",
              flush=True)
        write(self.name, self.doc)

    def finish(self, cols: list[str]) -> None:
        """Print the table and the centralized - federated gap; write the final JSON."""
        rows = [*self.doc["baselines"], *self.doc["rows"]]
        print(table(rows, cols))
        by = {r["mode"]: r for r in rows if "mode" in r}
        gap = ({k: by["centralized"][k] - by["federated"][k] for k in CATALOG}
               if {"centralized", "federated"} <= set(by) else {})
        print(f"centralized - federated: {gap}")
        self.doc["centralized_minus_federated"] = gap
        print("written:", write(self.name, self.doc))


def reranker_dir(choice: str, a: argparse.Namespace, out: Comparison) -> Path | None:
    """The cross-encoder for the second stage: a directory, one trained now (federated task=relevance), or none."""
    if choice == "none":
        return None
    if choice != "train":
        return Path(choice)
    run = run_simulation(["task=relevance", f"model={a.model}", f"simulation.num_merchants={a.merchants}",
                          "train.progress=false", *a.overrides])
    out.add(_row(f"cross-encoder, federated ({a.merchants} merchants, task=relevance), re-ranking the pretrained "
                 "bi-encoder's top 20", run["results"]["final"], run["wall_seconds"]))
    return Path(run["run_dir"]) / "model"


def main() -> None:
    """Run the settings and print/write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="retrieval", choices=["retrieval", "relevance"])
    ap.add_argument("--reranker", default="train", help="train | none | a cross-encoder directory")
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--modes", default="federated,centralized,alone")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = [f"task={a.task}", f"model={a.model}", f"simulation.num_merchants={a.merchants}", "train.progress=false",
            *a.overrides]
    cfg = compose(base)
    encoder = get_task(cfg).serves_as == "retriever"  # the dual encoder: the matrix with a second stage
    out = Comparison("compare" if encoder else f"compare_{a.task}", base)
    fd = D.prepare(cfg)
    out.doc["train_examples"], out.doc["test_examples"] = [len(t) for t in fd.train], len(fd.test)
    reranker = reranker_dir(a.reranker, a, out) if encoder else None
    for mode in a.modes.split(","):
        run = run_simulation([*base, f"mode={mode}"])
        if not out.doc["baselines"]:
            out.doc["evaluation"] = run["results"].get("evaluation")
            for row in baseline_rows(base, run["results"]["baselines"]):
                out.add(row, "baselines")
        out.add(trained_row(mode, run, a.merchants, encoder))
        if reranker is not None:
            out.add(second_stage_row(f"dual encoder, {STAGE_OF[mode]}", Path(run["run_dir"]) / "model", reranker,
                                     base))
    pair = ["ndcg@10"] if encoder else list(PAIR)
    out.finish(["setting", *pair, *CATALOG, "seconds"])


if __name__ == "__main__":
    main()
