"""Bring your own ESCI-shaped file at scale: one round of the dual encoder on N rows, with its peak memory.

Writes an ESCI-shaped CSV (the real dataset's column names: query_id, query, product_title, esci_label E/S/C/I;
no merchant column) of --rows rows from the built-in marketplace generator (distinct queries, not repeats), then
runs `python -m simulation data=esci data.path=<file> partition=iid` for one round of one local epoch over
--merchants merchants, sampling the RSS of the launcher and all its children (Ray workers included) every 0.2 s.
Writes bench/results/esci_scale.json.

    python bench/esci_scale.py --rows 100000
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

from _util import run_simulation, write

ESCI = {"exact": "E", "substitute": "S", "complement": "C", "irrelevant": "I"}


def write_esci(path: Path, rows: int) -> int:
    """The built-in generator's pairs, whole queries up to `rows` rows, with ESCI's column names; rows written."""
    from common.tasks import synthetic

    pairs = synthetic.generate_relevance(1, rows // 5, 0)
    by_query: dict[str, list[dict[str, Any]]] = {}
    for r in pairs:
        by_query.setdefault(str(r["query_id"]), []).append(r)
    written = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "query", "product_title", "esci_label"])
        for group in by_query.values():
            if written + len(group) > rows:
                break
            w.writerows([r["query_id"], r["query"], r["product_title"], ESCI[r["esci_label"]]] for r in group)
            written += len(group)
    return written


def main() -> None:
    """Write the file, run one round, report wall time, peak RSS and the round's metrics."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "esci.csv"
        rows = write_esci(path, a.rows)
        args = ["data=esci", f"data.path={path}", "partition=iid", f"simulation.num_merchants={a.merchants}",
                "strategy.num_rounds=1", "train.local_epochs=1", "train.progress=false", *a.overrides]
        print(f"{rows} rows ({path.stat().st_size / 2**20:.1f} MiB); python -m simulation {' '.join(args)}",
              flush=True)
        out = run_simulation(args, sample_rss=True)
    res = out["results"]
    row = {"rows": rows, "merchants": a.merchants, "overrides": args[2:], "wall_s": out["wall_seconds"],
           "peak_rss_GiB": out["peak_rss_bytes"] / 2**30, "test_examples": res["test_examples"],
           "round0": res["rounds"][0]["server"], "final": res["final"],
           "train_seconds": res["rounds"][-1].get("seconds")}
    print({k: v for k, v in row.items() if k not in {"round0", "final"}})
    print("final:", {k: v for k, v in res["final"].items() if isinstance(v, float)})
    print("written:", write("esci_scale", row))


if __name__ == "__main__":
    main()
