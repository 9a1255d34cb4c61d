"""Serving latency and throughput over real HTTP, side by side in one run: the dual encoder's forms (retrieving from
the whole catalog) and the cross-encoder's forms (re-ranking 100 candidates), the fastest encoder form that reaches
serving.min_agreement again with query micro-batching off, then a 1,000,000-product catalog.

Each setting starts `python -m serving` on 127.0.0.1, warms it, and is measured at concurrency 1 and 8 for --seconds
each: with wrk (Debian's package, a C load generator) when it is installed, else an async httpx load generator in
this process (which takes a good part of the 2 cores itself). Beside each encoder form:
its top-10 agreement with fp32 and its catalog nDCG@10 / recall@10 on the built-in marketplace's held-out judged
set (every catalog product judged for every query), the same evaluation the main job reports.

The 1M catalog: 1,000,000 generated products, each a variant of one of the built-in catalog's titles. Embedding a
million titles with MiniLM takes about an hour on 2 cores (the rate this run measures is printed), so their
vectors are made from the encoder's own vectors of the base titles plus Gaussian noise (--spread; cosine ~0.9 to
the base) and placed in the service's catalog cache; query encoding, HNSW search, rules and HTTP are the service's.
Reports HNSW build time, the service's RSS, latency, and recall@10 of the served top 10 against exact search.
Usage: python bench/serve_latency.py --encoder RUN/model [--teacher DIR] [--million 1000000] [--requests 300]
    [--seconds 60] [--work DIR]
Without --teacher a cross-encoder is trained first (task=relevance, mode=centralized, 2 rounds x 2 epochs);
without --encoder the pretrained all-MiniLM-L6-v2 is measured (same latency as any MiniLM-sized encoder).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from _util import ROOT, table, write

from common.run.config import compose
from common.run.env import OFFLINE
from common.tasks.evaluation import top_k
from common.tasks.metrics import catalog_ranking
from common.tasks.model import minilm_path
from common.tasks.registry import get_task
from serving.catalog import load_catalog
from serving.embedder import Embedder, top_agreement
from serving.index import cache_path

CANDIDATES = 100
ENCODER_FORMS = ("fp32", "int8", "onnx", "onnx-int8")
CROSS_FORMS = ("fp32", "int8", "onnx-int8")


def cli(module: str, args: list[str], cwd: Path) -> None:
    """Run `python -m module args`; raise with its output on failure."""
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
               replies: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Send bodies with `concurrency` workers until all are sent or `seconds` passed; latency stats (the replies
    kept in `replies`, in the bodies' order, when asked)."""
    latencies: list[float] = []
    errors = 0
    queue = list(reversed(list(enumerate(bodies))))
    deadline = time.perf_counter() + seconds
    got: dict[int, dict[str, Any]] = {}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue and time.perf_counter() < deadline:
            i, body = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(f"{url}/rank", json=body)
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200
            if replies is not None and r.status_code == 200:
                got[i] = r.json()

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if replies is not None:
        replies.extend(got[i] for i in sorted(got))
    ms = sorted(x * 1000 for x in latencies)
    return {"requests": len(ms), "errors": errors, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))], "requests_per_s": len(ms) / wall}


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "/rank", nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d, "duration_us": %%d}\\n',
    summary.requests, e.status + e.connect + e.read + e.write + e.timeout, latency:percentile(50),
    latency:percentile(99), summary.duration))
end
"""


def wrk_load(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float, work: Path) -> dict[str, float]:
    """The same measurement with wrk (a C load generator: far less of the 2 cores than httpx takes), cycling
    through the bodies for `seconds`."""
    script = work / "wrk_rank.lua"
    script.write_text(WRK_SCRIPT % ", ".join("[[" + json.dumps(b) + "]]" for b in bodies))
    out = subprocess.run(["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{int(seconds)}s",
                          "--timeout", "10s", "-s", str(script), url], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"requests": r["requests"], "errors": r["errors"], "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "requests_per_s": r["requests"] / (r["duration_us"] / 1e6)}


class Service:
    """`python -m serving` for one setting, started and waited for; stopped by PID on exit."""

    def __init__(self, work: Path, name: str, overrides: list[str], start_timeout: float = 900) -> None:
        port = free_port()
        self.url, self.log = f"http://127.0.0.1:{port}", work / f"serve-{name}-{port}.log"
        env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "serving", f"serving.port={port}",
                                          f"serving.max_candidates={CANDIDATES}", f"hydra.run.dir={work}/serve-{port}",
                                          "serving.rules.out_of_stock_penalty=0", *overrides],
                                         cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        self.start_s = time.perf_counter() - t0
        self.health = httpx.get(f"{self.url}/healthz").json()

    def measure(self, bodies: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        """Warm-up, then concurrency 1 and 8 (wrk when installed, else the httpx load generator)."""
        asyncio.run(load(self.url, bodies[:10], 1, 60))
        if shutil.which("wrk"):
            return {c: wrk_load(self.url, bodies, n, seconds, self.log.parent) for c, n in (("c1", 1), ("c8", 8))}
        return {"c1": asyncio.run(load(self.url, bodies, 1, seconds)), "c8": asyncio.run(load(self.url, bodies, 8,
                                                                                                seconds))}

    def rss_gib(self) -> float:
        """The service process's resident memory, GiB."""
        return psutil.Process(self.proc.pid).memory_info().rss / 2**30

    def close(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def flat(m: dict[str, Any]) -> dict[str, Any]:
    """c1_/c8_ prefixed latency and throughput figures of one measurement."""
    return {f"{c}_{k}": m[c][key] for c in ("c1", "c8") for k, key in
            (("p50_ms", "p50_ms"), ("p99_ms", "p99_ms"), ("rps", "requests_per_s"))} | {
        "errors": m["c1"]["errors"] + m["c8"]["errors"]}


def form_quality(encoder: Path, forms: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per encoder form, on the built-in held-out judged set: top-10 agreement with fp32, catalog nDCG@10, MRR,
    recall@10, and the catalog embedding rate (titles/s)."""
    cfg = compose(["task=retrieval"])
    task = get_task(cfg)
    judged = task.judged()
    assert judged is not None
    labels = ["exact", "substitute", "complement", "irrelevant"]
    gain = dict(zip(labels, task.label_gains(labels) or [], strict=True))
    g = np.array([[gain[x] for x in row] for row in judged.judgements])
    exact = np.array([[x == "exact" for x in row] for row in judged.judgements])
    titles = [p["title"] for p in judged.catalog]
    vecs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out: dict[str, dict[str, float]] = {}
    for form in forms:
        enc = Embedder(encoder, form, cfg.train.max_length)
        t0 = time.perf_counter()
        p = enc.encode(titles, 128)
        rate = len(titles) / (time.perf_counter() - t0)
        q = enc.encode(judged.queries)
        vecs[form] = (q, p)
        ref_q, ref_p = vecs["fp32"]
        scores = catalog_ranking(top_k(q @ p.T, 10), g, exact)
        out[form] = {"agreement@10": top_agreement(q, p, ref_q, ref_p), "titles_per_s": rate,
                     **{k: v for k, v in scores.items() if isinstance(v, float)}}
        print(form, {k: round(v, 4) for k, v in out[form].items()}, flush=True)
    return out


def million_catalog(work: Path, base_csv: Path, n: int, encoder: Path, form: str, spread: float,
                    cache: Path) -> Path:
    """A catalog of n generated products (variants of the base titles) and its vectors in the service's cache."""
    path = work / f"catalog_{n}.csv"
    base = load_catalog(base_csv).products
    if not path.is_file():
        with path.open("w") as f:
            f.write("id,title,category,brand,price,stock\n")
            for j in range(n):
                p = base[j % len(base)]
                title = f"{p.title} #{j // len(base)}".replace('"', "'")
                f.write(f'm{j:07d},"{title}",{p.category},{p.brand},{p.price or 0},{p.stock or 0}\n')
    catalog = load_catalog(path)
    enc = Embedder(encoder, form)
    target = cache_path(cache, enc, catalog)
    if not target.is_file():
        base_vecs = enc.encode([p.title for p in base], 128)
        rng = np.random.default_rng(0)
        rows = np.arange(n) % len(base)
        vecs = base_vecs[rows] + rng.normal(0, spread / np.sqrt(base_vecs.shape[1]), (n, base_vecs.shape[1]))
        vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, vecs)
    return path


def measure_million(work: Path, a: argparse.Namespace, encoder: Path, form: str, queries: list[str],
                    seconds: float) -> dict[str, Any]:
    """Serve the 1M catalog through HNSW; latency, RSS, build time, recall@10 of the served top 10 vs exact."""
    cache = work / "cache"
    path = million_catalog(work, work / "data" / "catalog.csv", a.million, encoder, form, a.spread, cache)
    ef = [f"serving.ann_ef_search={a.ef_search}"] if a.ef_search else []
    s = Service(work, f"million-{form}", [f"serving.model_dir={encoder}", f"serving.form={form}",
                                          f"serving.catalog={path}", f"serving.cache_dir={cache}",
                                          "serving.force_form=true", *ef])
    try:
        rss = s.rss_gib()
        bodies = [{"query": q, "k": 10} for q in queries]
        m = s.measure(bodies, seconds)
        replies: list[dict[str, Any]] = []
        asyncio.run(load(s.url, bodies, 1, 600, replies))
    finally:
        s.close()
    catalog = load_catalog(path)
    enc = Embedder(encoder, form)
    vecs = np.load(cache_path(cache, enc, catalog))
    sims = enc.encode(queries) @ vecs.T
    top = np.argpartition(-sims, 9, axis=1)[:, :10]  # the exact top 10 (a full sort of 1M columns is slow)
    exact = [row[np.argsort(-sims[i, row])].tolist() for i, row in enumerate(top)]
    ids = [p.id for p in catalog.products]
    recall = float(np.mean([len({ids[i] for i in e} & {x["id"] for x in r["results"]}) / 10
                            for e, r in zip(exact, replies, strict=True)]))
    return {"setting": f"dual encoder {form}, {a.million:,} products (HNSW)", "form": form, **flat(m),
            "recall@10_vs_exact": recall, "hnsw_build_s": s.health["index_build_s"], "start_s": s.start_s,
            "rss_GiB": rss, "retrieval": s.health["retrieval"], "ann_ef_search": a.ef_search or "default"}


def main() -> None:
    """Prepare data and models; measure every setting; print and write the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default=None, help="a dual-encoder directory (the main job's <run dir>/model)")
    ap.add_argument("--teacher", default=None, help="a cross-encoder directory (task=relevance)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--million", type=int, default=1_000_000, help="products in the large catalog (0: skip)")
    ap.add_argument("--spread", type=float, default=0.5, help="noise of the large catalog's variants")
    ap.add_argument("--ef-search", type=int, default=None, help="serving.ann_ef_search for the large catalog")
    ap.add_argument("--million-only", action="store_true",
                    help="keep bench/results/serve_latency.json's rows and measure the large catalog again")
    ap.add_argument("--work", default=None, help="reuse this directory's data/, teacher and caches")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fedshop-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "catalog.csv").is_file():
        cli("serving.make_catalog", [str(work / "data")], work)
    encoder = Path(a.encoder or minilm_path())
    teacher = Path(a.teacher or work / "teacher" / "model")
    if not (teacher / "config.json").is_file():
        cli("simulation", ["task=relevance", "mode=centralized", "strategy.num_rounds=2", "train.progress=false",
                           f"hydra.run.dir={work}/teacher"], work)
    catalog = work / "data" / "catalog.csv"
    ids = [p.id for p in load_catalog(catalog).products]
    queries = [json.loads(x)["query"] for x in (work / "data" / "queries.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    asked = [rng.choice(queries) for _ in range(a.requests)]
    doc: dict[str, Any] = {"encoder": str(encoder), "teacher": str(teacher), "candidates": CANDIDATES,
                           "load_generator": "wrk" if shutil.which("wrk") else "httpx",
                           "catalog_products": len(ids), "rows": []}
    if a.million_only:
        doc = json.loads((ROOT / "bench" / "results" / "serve_latency.json").read_text())
        best = min((r for r in doc["rows"][:len(ENCODER_FORMS)] if r["agreement@10"] >= 0.99),
                   key=lambda r: r["c1_p99_ms"])["form"]
        doc["million"] = measure_million(work, a, encoder, best, queries, a.seconds)
        print(table([doc["million"]], list(doc["million"])))
        print("written:", write("serve_latency", doc))
        return
    quality = form_quality(encoder, ENCODER_FORMS)
    doc["encoder_forms"] = quality
    for form in ENCODER_FORMS:
        s = Service(work, f"encoder-{form}", [f"serving.model_dir={encoder}", f"serving.form={form}",
                                              f"serving.catalog={catalog}", f"serving.cache_dir={work}/cache",
                                              f"serving.agreement_queries={work}/data/queries.jsonl",
                                              "serving.force_form=true"])  # refused below 0.99: measured anyway
        try:
            rss, m = s.rss_gib(), s.measure([{"query": q, "k": 10} for q in asked], a.seconds)
        finally:
            s.close()
        doc["rows"].append({"setting": f"dual encoder {form}, retrieve from the catalog", "form": form, **flat(m),
                            "rss_GiB": rss, **{k: quality[form][k] for k in ("agreement@10", "catalog_ndcg@10",
                                                                            "catalog_recall@10")},
                            "served_without_force": quality[form]["agreement@10"] >= 0.99})
        write("serve_latency", doc)
    for form in CROSS_FORMS:
        s = Service(work, f"cross-{form}", [f"serving.model_dir={teacher}", f"serving.form={form}",
                                            f"serving.catalog={catalog}", f"serving.cache_dir={work}/cache"])
        try:
            rss, m = s.rss_gib(), s.measure([{"query": q, "candidates": rng.sample(ids, CANDIDATES), "k": 10}
                                             for q in asked], a.seconds)
        finally:
            s.close()
        doc["rows"].append({"setting": f"cross-encoder {form}, {CANDIDATES} candidates", "form": form, **flat(m),
                            "rss_GiB": rss})
        write("serve_latency", doc)
    ok = [r for r in doc["rows"][:len(ENCODER_FORMS)] if r["agreement@10"] >= 0.99]
    best = min(ok, key=lambda r: r["c1_p99_ms"])["form"]
    s = Service(work, f"encoder-{best}-unbatched", [f"serving.model_dir={encoder}", f"serving.form={best}",
                                                    f"serving.catalog={catalog}", f"serving.cache_dir={work}/cache",
                                                    "serving.query_batch_max_requests=1"])
    try:
        m = s.measure([{"query": q, "k": 10} for q in asked], a.seconds)
    finally:
        s.close()
    doc["rows"].append({"setting": f"dual encoder {best}, query batching off", "form": best, **flat(m)})
    write("serve_latency", doc)
    print(table(doc["rows"], ["setting", "c1_p50_ms", "c1_p99_ms", "c8_p99_ms", "c8_rps", "agreement@10",
                              "catalog_ndcg@10", "served_without_force", "rss_GiB", "errors"]))
    if a.million:
        doc["million"] = measure_million(work, a, encoder, best, queries, a.seconds)
        print(table([doc["million"]], list(doc["million"])))
    print("written:", write("serve_latency", doc))


if __name__ == "__main__":
    main()
