"""Is the cross-encoder worth a second stage? The dual encoder alone against the dual encoder's top
eval.catalog_top_n re-ranked by the cross-encoder, on the built-in marketplace's held-out catalog and hard queries.

    python bench/two_stage.py --encoder <retrieval run>/model --reranker <relevance run>/model

Both directories are what the runs wrote (`python -m simulation` and `python -m simulation task=relevance`).
Writes bench/results/two_stage.json; the service keeps the second stage only if it adds at least 1 pt of
catalog nDCG@10.
"""

from __future__ import annotations

import argparse
from typing import Any

from _util import table, write
from transformers import AutoModelForSequenceClassification

from common.run.config import compose
from common.tasks import data as D
from common.tasks.registry import get_task

CATALOG = ("catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")


def main() -> None:
    """Score both settings and write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--reranker", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = compose(["task=relevance", f"eval.retriever={a.encoder}", *a.overrides])
    fd = D.prepare(cfg)
    task = get_task(cfg)
    wb = task.workbench(fd.labels)
    ev = task.evaluation(wb, fd.test)
    reranker = AutoModelForSequenceClassification.from_pretrained(a.reranker)
    both = ev(reranker, True)
    rows: list[dict[str, Any]] = [
        {"setting": "dual encoder alone", **{k: ev.baselines()["retrieval"][k] for k in CATALOG}},
        {"setting": f"dual encoder + cross-encoder (top {cfg.eval.catalog_top_n})", **{k: both[k] for k in CATALOG}},
        {"setting": "keyword TF-IDF", **{k: ev.baselines()["keyword"][k] for k in CATALOG}}]
    gain = rows[1]["catalog_ndcg@10"] - rows[0]["catalog_ndcg@10"]
    print(table(rows, ["setting", *CATALOG]))
    print(f"second stage adds {gain:+.4f} catalog nDCG@10 (kept in the service only at +0.01 or more)")
    print("written:", write("two_stage", {"encoder": a.encoder, "reranker": a.reranker, "rows": rows,
                                          "second_stage_gain": gain, "keep_second_stage": gain >= 0.01}))


if __name__ == "__main__":
    main()
