"""`python -m serving.make_catalog OUT [overrides]`: a product catalog and query log from the built-in marketplace.

Writes OUT/catalog.csv (id, title, category, brand, price, stock, margin, promoted: one row per distinct
product title of the training data and the held-out catalog, business fields drawn from a fixed seed),
OUT/queries.jsonl (the held-out test set: query, the catalog id of each judged product and its label) and
OUT/query_log.txt (the marketplace's own search log, one query per line: fresh queries from another seed,
disjoint from every merchant's data; what distillation trains on).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

from common.run.config import FedshopConfig, compose
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks.registry import get_task
from common.tasks.synthetic import BRANDS, generate_relevance


def write_catalog(cfg: FedshopConfig, out: Path) -> tuple[Path, Path]:
    """Write catalog.csv, queries.jsonl and query_log.txt under out; returns the first two paths."""
    if not get_task(cfg).pair:
        raise FedshopError(f"data.task={cfg.data.task}: a catalog needs (query, product) data")
    raw, _ = D.load_raw(cfg)
    fd = D.prepare(cfg)
    rng = random.Random(cfg.seed)
    ids: dict[str, str] = {}
    rows = []
    judged_set = D.judged_set(cfg)
    held_out = [(p["title"], p["category"]) for p in judged_set.catalog] if judged_set is not None else []
    for title, category in [*zip(raw["product_title"], raw["category"], strict=True), *held_out]:
        if title in ids:
            continue
        ids[title] = f"p{len(ids):05d}"
        brand = next((b for b in BRANDS if title.startswith(b)), "")
        rows.append({"id": ids[title], "title": title, "category": category, "brand": brand,
                     "price": round(rng.uniform(5, 500), 2), "stock": 0 if rng.random() < 0.1 else rng.randint(1, 200),
                     "margin": round(rng.uniform(0.05, 0.4), 3), "promoted": int(rng.random() < 0.1)})
    out.mkdir(parents=True, exist_ok=True)
    catalog = out / "catalog.csv"
    with catalog.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    queries = out / "queries.jsonl"
    judged: dict[str, dict[str, object]] = {}
    for text, pair, label, qid in zip(fd.test["text"], fd.test["text_pair"], fd.test["label"], fd.test["query_id"],
                                      strict=True):
        entry = judged.setdefault(qid, {"query_id": qid, "query": text, "judgements": {}})
        entry["judgements"][ids[pair]] = fd.labels[label]  # type: ignore[index]
    with queries.open("w") as f:
        for entry in judged.values():
            f.write(json.dumps(entry) + "\n")
    s = cfg.data.synthetic
    log_rows = generate_relevance(s.num_merchants, s.num_queries, cfg.seed + 7919, s.concentration, 0.0)
    test_queries = {str(e["query"]) for e in judged.values()}
    logged = [q for q in dict.fromkeys(str(r["query"]) for r in log_rows) if q not in test_queries]
    (out / "query_log.txt").write_text("\n".join(logged) + "\n")
    return catalog, queries


def main() -> None:
    """Command-line entry point."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    try:
        catalog, queries = write_catalog(compose(sys.argv[2:]), Path(sys.argv[1]))
    except FedshopError as exc:
        sys.exit(f"fedshop: error: {exc}")
    print(f"wrote {catalog} and {queries}")


if __name__ == "__main__":
    main()
