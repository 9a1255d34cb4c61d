"""One merchant's large shard: read, validate + split, tokenise; rows/s and peak memory at 10k, 100k and 1M rows.

Each size runs in a fresh process (its peak memory is its own): the CSV is the built-in marketplace's
query-product pairs repeated to N rows, read, validated and split as a merchant's deploy.shard is
(common/data.load_shard's steps, timed one by one) and tokenised with the default model's tokenizer at
train.max_length (common/model.tokenize), once per data.num_proc value. Every size runs twice on one cache
directory: "cold" (an empty cache) and "cached" (a restarted merchant: the tokens are read back, not redone).
Peak RSS counts the pages of memory-mapped Arrow files the process touched (the kernel can drop them); peak
own memory (RssAnon, sampled every 20 ms) is what the process itself holds.
Usage: python bench/large_shard.py [--rows 10000 100000 1000000] [--num-proc 1 2]
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
import json, resource, sys, threading, time
from common.run.config import compose
from common.tasks import data as D
from common.tasks import model as M

peak = [0]
def watch():  # the process's own memory (RssAnon): RSS less the pages of memory-mapped files the kernel may drop
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
cfg = compose(["data=csv", "data.path=" + sys.argv[1], "data.num_proc=" + sys.argv[2]])
tokenizer = M.load_tokenizer(cfg.model)
t0 = time.perf_counter()
raw = D.read_file(sys.argv[1], "auto", "deploy.shard")
t1 = time.perf_counter()
ds, labels = D.normalize(raw, cfg.data, "bench")
train, val = D.group_split(ds, cfg.data.val_fraction, cfg.seed, "val:bench")
t2 = time.perf_counter()
M.tokenize(train, tokenizer, cfg.train.max_length, cfg.data.num_proc)
t3 = time.perf_counter()
time.sleep(0.05)
print(json.dumps({"read_s": t1 - t0, "validate_split_s": t2 - t1, "tokenize_s": t3 - t2, "train_rows": len(train),
                  "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_MiB": peak[0] / 1024,
                  "worker_peak_rss_MiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_shard(path: Path, rows: int) -> None:
    """The synthetic marketplace's pairs, repeated to `rows` rows, as a merchant's CSV."""
    from common.tasks import synthetic

    base = synthetic.generate_relevance(1, 2000, 0)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query", "product_title", "label", "merchant", "query_id"])
        for i in range(rows):
            r = base[i % len(base)]
            w.writerow([r["query"], r["product_title"], r["esci_label"], "m0", f"{r['query_id']}-{i // len(base)}"])


def _child(path: Path, num_proc: int, cache: Path) -> dict[str, float]:
    env = {**OFFLINE, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(num_proc)], cwd=ROOT, capture_output=True,
                          text=True, env=env, check=True)
    out: dict[str, float] = json.loads(proc.stdout.splitlines()[-1])
    return out


def main() -> None:
    """Run each size in its own process, first with an empty cache, then again (a restarted merchant)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values to measure")
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.rows:
            path = Path(tmp) / f"shard_{n}.csv"
            write_shard(path, n)
            for num_proc in a.num_proc:
                cache = Path(tmp) / f"cache_{n}_{num_proc}"
                for run in ("cold", "cached"):
                    row = {"rows": n, "num_proc": num_proc, "run": run, "file_MiB": path.stat().st_size / 2**20,
                           **_child(path, num_proc, cache)}
                    row["rows_per_s"] = n / (row["read_s"] + row["validate_split_s"] + row["tokenize_s"])
                    out.append(row)
                    print(row, flush=True)
            path.unlink()
    cols = ["rows", "num_proc", "run", "file_MiB", "read_s", "validate_split_s", "tokenize_s", "rows_per_s",
            "peak_rss_MiB", "peak_anon_MiB", "worker_peak_rss_MiB"]
    print(table(out, cols))
    first = out[0]
    for r in out:
        if r["run"] == "cold":
            rss, own = r["peak_rss_MiB"] / first["peak_rss_MiB"], r["peak_anon_MiB"] / first["peak_anon_MiB"]
            print(f"{r['rows']} rows, num_proc={r['num_proc']}: peak RSS {rss:.2f}x, own memory {own:.2f}x "
                  f"{first['rows']} rows; {r['rows_per_s']:.0f} rows/s")
    print("written:", write("large_shard", {"rows": out}))


if __name__ == "__main__":
    main()
