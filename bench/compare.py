"""Federated (non-IID merchants) vs centralized vs merchants-alone vs keyword and retrieval alone, on the held-out
evaluation every run scores (common/tasks/evaluation.py): judged pairs, the catalog ranking and the hard queries.

Same data, model and total epochs (num_rounds x local_epochs) for the three trained settings.
Usage: python bench/compare.py [--merchants 10] [--model minilm] [--modes federated,centralized,alone] [overrides...]
"""

from __future__ import annotations

import argparse
from typing import Any

from _util import run_simulation, table, write

from common.run.config import compose
from common.tasks import data as D
from common.tasks.baseline import KeywordBaseline
from common.tasks.registry import get_task

PAIR = ("accuracy", "macro_f1", "ndcg@10")
CATALOG = ("catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")
LABELS = {"federated": "federated ({strategy}, {n} merchants)", "centralized": "centralized (pooled)",
          "alone": "merchants alone (weighted mean)"}


def trained_row(mode: str, out: dict[str, Any], merchants: int) -> dict[str, Any]:
    """A compare.json row from one run's results.json."""
    res, final = out["results"], out["results"]["final"]
    return {"setting": LABELS[mode].format(strategy=res.get("strategy", "FedAvg"), n=merchants),
            **{k: final.get(k) for k in (*PAIR, *CATALOG)}, "recall": final.get("recall"),
            "hard_first_by_kind": final.get("hard_first_by_kind"), "test_examples": res["test_examples"],
            "seconds": out["wall_seconds"]}


def baseline_rows(cfg_overrides: list[str], baselines: dict[str, Any], test_examples: int) -> list[dict[str, Any]]:
    """Keyword TF-IDF (its pair metrics and catalog ranking) and bi-encoder retrieval alone (catalog only)."""
    cfg = compose(cfg_overrides)
    fd = D.prepare(cfg)
    gains = get_task(cfg).label_gains(fd.labels)
    assert gains is not None, "the comparison needs a ranking task"
    kw = KeywordBaseline(len(fd.labels)).fit(fd.pooled_train)
    pairs = kw.evaluate(fd.test, gains)
    rows = []
    for name, extra in (("keyword TF-IDF", pairs), ("retrieval alone (bi-encoder)", {})):
        cat = baselines["keyword" if name.startswith("keyword") else "retrieval"]
        rows.append({"setting": name, **{k: extra.get(k) for k in PAIR}, **{k: cat.get(k) for k in CATALOG},
                     "recall": None, "hard_first_by_kind": cat.get("hard_first_by_kind"),
                     "test_examples": test_examples, "seconds": 0.0})
    return rows


def main() -> None:
    """Run the settings and print/write the comparison."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--modes", default="federated,centralized,alone")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = ["task=relevance", f"model={a.model}", f"simulation.num_merchants={a.merchants}", "train.progress=false",
            *a.overrides]
    trained: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    test_examples = 0
    for mode in a.modes.split(","):
        out = run_simulation([*base, f"mode={mode}"])
        trained.append(trained_row(mode, out, a.merchants))
        baselines, test_examples = out["results"].get("baselines") or {}, out["results"]["test_examples"]
        print(f"{trained[-1]['setting']}: {trained[-1]}", flush=True)
    rows = [*baseline_rows(base, baselines, test_examples), *trained]
    print(table(rows, ["setting", *PAIR, *CATALOG, "seconds"]))
    print(table([{"setting": r["setting"], **(r["recall"] or {})} for r in trained],
                ["setting", *(trained[0]["recall"] or {})]))
    by = {r["setting"].split(" ")[0]: r for r in rows}
    gap = ({k: by["centralized"][k] - by["federated"][k] for k in (*PAIR, *CATALOG)}
           if {"centralized", "federated"} <= set(by) else {})
    print(f"centralized - federated: {gap} (target: macro_f1 and catalog_ndcg@10 within 0.01)")
    fd = D.prepare(compose(base))
    print("written:", write("compare", {"overrides": base, "rows": rows, "centralized_minus_federated": gap,
                                        "train_examples": [len(t) for t in fd.train], "test_examples": test_examples,
                                        "evaluation": out["results"].get("evaluation")}))


if __name__ == "__main__":
    main()
