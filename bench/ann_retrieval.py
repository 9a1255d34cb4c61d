"""Candidate retrieval for large catalogs: exact top-100 vs the HNSW index, side by side in one run.

Catalog vectors are synthetic unit vectors in 384 dimensions (MiniLM's width) drawn around 2,000 product
"families" (real catalogs are clustered, uniform random vectors are not; --spread sets how tightly);
queries are fresh draws near random families. Reports per-query latency p50/p99 for exact search and for
HNSW at each efSearch, the HNSW build time and recall@100 (the share of the exact top-100 that HNSW returns).
Usage: python bench/ann_retrieval.py [--products 100000 300000] [--queries 300] [--ef 128 256 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _util import table, write

from serving.index import VectorIndex

DIM, FAMILIES, TOP = 384, 2000, 100


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def draw(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    """n unit vectors, each near a random family center."""
    picks = rng.integers(0, len(centers), n)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 50_000):
        idx = picks[start:start + 50_000]
        out[start:start + len(idx)] = unit(centers[idx] + spread * rng.standard_normal((len(idx), DIM)))
    return out


def timed(index: VectorIndex, queries: np.ndarray) -> tuple[list[list[int]], dict[str, float]]:
    """Results and latency stats (ms) of searching each query."""
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(index.search(q, TOP))
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return found, {"p50_ms": statistics.median(times), "p99_ms": times[int(round(0.99 * (len(times) - 1)))]}


def main() -> None:
    """Measure exact and HNSW retrieval for each catalog size; print and write the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--spread", type=float, default=0.03)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((FAMILIES, DIM)))
    rows = []
    for n in a.products:
        vectors, queries = draw(rng, centers, n, a.spread), draw(rng, centers, a.queries, a.spread)
        exact = VectorIndex(vectors, ann_min=n + 1)
        hnsw = VectorIndex(vectors, ann_min=1)
        truth, e = timed(exact, queries)
        for ef in a.ef:
            hnsw.ef_search = ef
            got, h = timed(hnsw, queries)
            recall = float(np.mean([len(set(t) & set(g)) / TOP for t, g in zip(truth, got, strict=True)]))
            rows.append({"products": n, "ef_search": ef, "exact_p50_ms": e["p50_ms"], "exact_p99_ms": e["p99_ms"],
                         "hnsw_p50_ms": h["p50_ms"], "hnsw_p99_ms": h["p99_ms"],
                         "speedup_p50": e["p50_ms"] / h["p50_ms"], "recall@100": recall,
                         "hnsw_build_s": hnsw.build_seconds})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    print("written:", write("ann_retrieval", {"dim": DIM, "families": FAMILIES, "spread": a.spread, "top": TOP,
                                               "m": 32, "rows": rows}))


if __name__ == "__main__":
    main()
