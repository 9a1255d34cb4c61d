"""Federated (non-IID merchants) vs centralized vs merchants-alone vs a TF-IDF keyword baseline.

Same data, model and total epochs (num_rounds x local_epochs) for the three trained settings.
Usage: python bench/compare.py [--merchants 10] [--model minilm] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
from typing import Any

from _util import run_simulation, table, write

from common import data as D
from common.baseline import KeywordBaseline
from common.config import compose


def main() -> None:
    """Run the four settings and print/write the comparison."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = [f"model={a.model}", f"simulation.num_merchants={a.merchants}", "train.progress=false", *a.overrides]
    rows: list[dict[str, Any]] = []
    cfg = compose(base)
    fd = D.prepare(cfg)
    kw = KeywordBaseline(len(fd.labels)).fit(fd.pooled_train)
    gains = D.label_gains(cfg.data, fd.labels)
    assert gains is not None, "the comparison needs a relevance task"
    rows.append({"setting": "keyword TF-IDF", **kw.evaluate(fd.test, gains),
                 "seconds": 0.0})
    for mode in ("federated", "centralized", "alone"):
        out = run_simulation([*base, f"mode={mode}"])
        final = out["results"]["final"]
        label = {"federated": f"federated FedAvg ({a.merchants} merchants)", "centralized": "centralized (pooled)",
                 "alone": "merchants alone (weighted mean)"}[mode]
        rows.append({"setting": label, **{k: final[k] for k in ("accuracy", "macro_f1", "ndcg@10")},
                     "seconds": out["wall_seconds"]})
        print(f"{label}: {final}", flush=True)
    cols = ["setting", "accuracy", "macro_f1", "ndcg@10", "seconds"]
    print(table(rows, cols))
    fed, cen = rows[1], rows[2]
    gap = {k: cen[k] - fed[k] for k in ("accuracy", "macro_f1", "ndcg@10")}
    print(f"centralized - federated: {gap} (target: accuracy gap <= 0.02)")
    print("written:", write("compare", {"overrides": base, "rows": rows, "centralized_minus_federated": gap,
                                        "train_examples": [len(t) for t in fd.train], "test_examples": len(fd.test)}))


if __name__ == "__main__":
    main()
