"""One merchant's large shard: read, validate + split, tokenise; rows/s and peak RSS at 10k, 100k and 1M rows.

Each size runs in a fresh process (its peak RSS is its own): the CSV is the built-in marketplace's query-product
pairs repeated to N rows, read, validated and split as a merchant's deploy.shard is (common/data.load_shard's
steps, timed one by one) and tokenised with the default model's tokenizer at train.max_length (common/model.tokenize).
Usage: python bench/large_shard.py [--rows 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _util import OFFLINE, ROOT, table, write

CHILD = """
import json, resource, sys, time
from common.config import compose
from common import data as D, model as M
cfg = compose(["data=csv", "data.path=" + sys.argv[1]])
t0 = time.perf_counter()
raw = D.read_file(sys.argv[1], "auto", "deploy.shard")
t1 = time.perf_counter()
ds, labels = D.normalize(raw, cfg.data, "bench")
train, val = D.group_split(ds, cfg.data.val_fraction, cfg.seed, "val:bench")
t2 = time.perf_counter()
M.tokenize(train, M.load_tokenizer(cfg.model), cfg.train.max_length)
t3 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "validate_split_s": t2 - t1, "tokenize_s": t3 - t2, "train_rows": len(train),
                  "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_shard(path: Path, rows: int) -> None:
    """The synthetic marketplace's pairs, repeated to `rows` rows, as a merchant's CSV."""
    from common import synthetic

    base = synthetic.generate_relevance(1, 2000, 0)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query", "product_title", "label", "merchant", "query_id"])
        for i in range(rows):
            r = base[i % len(base)]
            w.writerow([r["query"], r["product_title"], r["esci_label"], "m0", f"{r['query_id']}-{i // len(base)}"])


def main() -> None:
    """Run each size in its own process; print and write the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.rows:
            path = Path(tmp) / f"shard_{n}.csv"
            write_shard(path, n)
            proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                                  env={**OFFLINE, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, check=True)
            row = {"rows": n, "file_MiB": path.stat().st_size / 2**20, **json.loads(proc.stdout.splitlines()[-1])}
            total = row["read_s"] + row["validate_split_s"] + row["tokenize_s"]
            row["rows_per_s"] = n / total
            out.append(row)
            print(row, flush=True)
    cols = ["rows", "file_MiB", "read_s", "validate_split_s", "tokenize_s", "rows_per_s", "peak_rss_MiB"]
    print(table(out, cols))
    for r in out:
        ratio = r["peak_rss_MiB"] / out[0]["peak_rss_MiB"]
        print(f"{r['rows']} rows: peak RSS {r['peak_rss_MiB']:.0f} MiB = {ratio:.2f}x {out[0]['rows']} rows; "
              f"{r['rows_per_s']:.0f} rows/s")
    print("written:", write("large_shard", {"rows": out}))


if __name__ == "__main__":
    main()
