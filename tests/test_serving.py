"""The ranking service: catalog validation, business rules, and real HTTP against `python -m serving`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.run.errors import FedshopError
from serving.catalog import Product, load_catalog
from serving.rules import Ranked, Rules, rerank
from tests.conftest import ROOT, run_cli

CATALOG_ARGS = ["task=relevance",
                "data.synthetic.num_queries=40", "data.synthetic.test_queries=40", "data.synthetic.hard_queries=10",
                "simulation.num_merchants=3"]


def product(pid: str, category: str = "c", price: float | None = 10.0, stock: int | None = 5,
            margin: float | None = None, promoted: bool = False) -> Product:
    return Product(id=pid, title=f"title {pid}", category=category, brand="", price=price, stock=stock,
                   margin=margin, promoted=promoted)


def ids(items: list[Ranked]) -> list[str]:
    return [r.product.id for r in items]


def scored(*pairs: tuple[Product, float]) -> list[Ranked]:
    return [Ranked(p, s) for p, s in pairs]


def test_without_rules_order_is_the_model_order():
    top, filtered = rerank(scored((product("a"), 0.2), (product("b"), 0.9), (product("c"), 0.5)), Rules(0.0), 3)
    assert ids(top) == ["b", "c", "a"] and filtered == []
    assert [r.model_rank for r in top] == [1, 2, 3]


def test_out_of_stock_is_demoted_and_explained():
    items = scored((product("a", stock=0), 0.9), (product("b"), 0.5))
    top, _ = rerank(items, Rules(out_of_stock_penalty=1.0), 2)
    assert ids(top) == ["b", "a"]
    assert top[1].rules == [{"rule": "out_of_stock", "delta": -1.0}]
    assert top[1].final_score == pytest.approx(0.9 - 1.0)


def test_margin_and_promotion_boosts_move_products_up():
    items = scored((product("a", margin=0.0), 0.50), (product("b", margin=0.4), 0.45))
    assert ids(rerank(items, Rules(0.0, margin_weight=0.2), 2)[0]) == ["b", "a"]
    items = scored((product("a"), 0.50), (product("b", promoted=True), 0.45))
    top, _ = rerank(items, Rules(0.0, promotion_boost=0.1), 2)
    assert ids(top) == ["b", "a"] and top[0].rules == [{"rule": "promotion_boost", "delta": 0.1}]


def test_price_range_filters_with_reasons():
    items = scored((product("a", price=5.0), 0.9), (product("b", price=50.0), 0.8), (product("c", price=500.0), 0.7))
    top, filtered = rerank(items, Rules(0.0, price_min=10.0, price_max=100.0), 3)
    assert ids(top) == ["b"]
    assert {f["id"]: f["rule"] for f in filtered} == {"a": "price_range", "c": "price_range"}


def test_category_diversity_caps_each_category_in_the_top_k():
    items = scored((product("a", "shoes"), 0.9), (product("b", "shoes"), 0.8), (product("c", "shoes"), 0.7),
                   (product("d", "hats"), 0.1))
    top, _ = rerank(items, Rules(0.0, max_per_category=2), 3)
    assert ids(top) == ["a", "b", "d"]
    assert ids(rerank(items, Rules(0.0), 3)[0]) == ["a", "b", "c"]


def test_ties_are_broken_deterministically():
    items = scored((product("b"), 0.5), (product("a"), 0.5))
    assert ids(rerank(items, Rules(0.0), 2)[0]) == ["a", "b"]


@pytest.mark.parametrize("content,message", [
    ("title,price\nx,1\n", "missing column(s) ['id']"),
    ("id,title,price\np1,shoe,cheap\n", "row 2: column 'price' must be a number, got 'cheap'"),
    ("id,title,stock\np1,shoe,1\np1,boot,2\n", "row 3: duplicate id 'p1'"),
    ("id,title,stock\np1,,1\n", "row 2: empty 'title'"),
    ("id,title,stock\np1,shoe,-3\n", "row 2: column 'stock' must be a whole number >= 0"),
])
def test_bad_catalog_rows_are_named(tmp_path, content, message):
    path = tmp_path / "catalog.csv"
    path.write_text(content)
    with pytest.raises(FedshopError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_catalog(path)


# ---------------------------------------------------------------- real HTTP against python -m serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(out: Path, seed: int) -> Path:
    """A tiny random BERT saved like a fedshop run's model/ directory."""
    from common.run.config import compose
    from common.tasks import model as M

    cfg = compose(["task=relevance", "model=tiny", "finetune=full"])
    M.save_final(M.build_model(cfg.model, ["exact", "substitute", "complement", "irrelevant"], seed, cfg.finetune),
                 M.load_tokenizer(cfg.model), ["exact", "substitute", "complement", "irrelevant"], out)
    return out


class Server:
    """`python -m serving` on a free 127.0.0.1 port, stopped (by PID) at the end."""

    def __init__(self, root: Path, model_dir: Path, catalog: Path, *more: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = root / f"serving-{self.port}.log"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving", f"serving.model_dir={model_dir}", f"serving.catalog={catalog}",
                 f"serving.port={self.port}", "train.num_threads=1", f"hydra.run.dir={root}/run-{self.port}", *more],
                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, "service never became healthy"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_shop(root: Path) -> Path:
    """The built-in marketplace's catalog (small) under root/data, by python -m serving.make_catalog."""
    proc = run_cli("serving.make_catalog", [str(root / "data"), *CATALOG_ARGS], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "data" / "catalog.csv"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    catalog = make_shop(root)
    return root, make_model(root / "model_a", 1), make_model(root / "model_b", 2), catalog


@pytest.fixture(scope="module")
def server(assets):
    root, model_a, _, catalog = assets
    s = Server(root, model_a, catalog, "serving.rules.margin_weight=0.5", "serving.rules.promotion_boost=0.2",
               "serving.rules.max_per_category=2", "serving.max_candidates=50", "serving.batch_max_requests=8")
    yield s
    s.close()


def catalog_ids(assets, n: int) -> list[str]:
    return [p.id for p in load_catalog(assets[3]).products[:n]]


def test_rank_contract_and_explained_scores(server, assets):
    cands = catalog_ids(assets, 30)
    r = httpx.post(f"{server.url}/rank", json={"query": "red running shoes", "candidates": cands, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert body["k"] == 10 and len(results) == 10 and body["retrieved"] is False
    assert [x["rank"] for x in results] == list(range(1, 11))
    assert {x["id"] for x in results} <= set(cands)
    for x in results:
        moved = sum(rule.get("delta", 0.0) for rule in x["rules"])
        assert x["final_score"] == pytest.approx(x["model_score"] + moved, abs=1e-5)
    counts: dict[str, int] = {}
    for x in results:
        counts[x["category"]] = counts.get(x["category"], 0) + 1
    assert max(counts.values()) <= 2
    assert body["model_version"].endswith("-fp32")


def test_rank_retrieves_from_the_catalog_without_candidates(server):
    r = httpx.post(f"{server.url}/rank", json={"query": "wireless headphones", "k": 5})
    assert r.status_code == 200, r.text
    assert r.json()["retrieved"] is True and len(r.json()["results"]) == 5
    assert httpx.get(f"{server.url}/healthz").json()["retrieval"] == "exact"  # a small catalog: exact top-N


def test_request_price_range_filters(server, assets):
    cands = catalog_ids(assets, 30)
    r = httpx.post(f"{server.url}/rank", json={"query": "lamp", "candidates": cands, "k": 30, "price_max": 100})
    assert r.status_code == 200
    assert all(x["price"] <= 100 for x in r.json()["results"])
    assert all(f["rule"] == "price_range" for f in r.json()["filtered"])


@pytest.mark.parametrize("body,status,needle", [
    ({"query": "   ", "k": 3}, 422, "query must not be empty"),
    ({"query": "x" * 501}, 422, "more than 500"),
    ({"query": "shoes", "candidates": ["nope-1", "nope-2"]}, 404, "not in the catalog"),
    ({"query": "shoes", "candidates": [f"p{i:05d}" for i in range(51)]}, 413, "more than 50"),
    ({"query": "shoes", "k": 0}, 422, "k=0"),
    ({"query": 7}, 422, "query"),
    ({"query": "shoes", "k": "ten"}, 422, "k"),
    ({"query": "shoes", "candidates": "p00001"}, 422, "candidates"),
    ({"query": "shoes", "colour": "red"}, 422, "colour"),
    ({"query": "shoes", "candidates": []}, 422, "must not be empty"),
])
def test_bad_input_gets_a_clear_4xx(server, body, status, needle):
    r = httpx.post(f"{server.url}/rank", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_malformed_json_is_a_4xx_not_a_crash(server):
    r = httpx.post(f"{server.url}/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body" and r.json()["error"].startswith("body: ")
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_metrics_count_requests_and_errors(server):
    before = httpx.get(f"{server.url}/metrics").text
    httpx.post(f"{server.url}/rank", json={"query": ""})
    httpx.post(f"{server.url}/rank", json={"query": "mug", "k": 2})
    text = httpx.get(f"{server.url}/metrics").text

    def value(body: str, line: str) -> float:
        return next((float(x.rsplit(" ", 1)[1]) for x in body.splitlines() if x.startswith(line + " ")), 0.0)

    ok, bad = 'fedshop_requests_total{endpoint="/rank",status="200"}', \
        'fedshop_requests_total{endpoint="/rank",status="422"}'
    assert value(text, ok) == value(before, ok) + 1
    assert value(text, bad) == value(before, bad) + 1
    assert 'fedshop_request_seconds_bucket{endpoint="/rank",le="+Inf"}' in text
    assert "fedshop_model_info{version=" in text
    assert value(text, "fedshop_batched_requests_total") >= value(before, "fedshop_batched_requests_total") + 1


def test_model_swap_under_concurrent_requests_loses_none(server, assets):
    _, model_a, model_b, _ = assets
    cands = catalog_ids(assets, 20)
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"{server.url}/rank", json={"query": "desk lamp", "candidates": cands, "k": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    old = httpx.get(f"{server.url}/healthz").json()["model_version"]
    swap = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(model_b)}, timeout=120)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert swap.status_code == 200, swap.text
    new = swap.json()["model_version"]
    assert new != old and httpx.get(f"{server.url}/healthz").json()["model_version"] == new
    assert statuses and set(statuses) == {200}, statuses
    assert {old, new} <= versions
    counters = {line.split(" ")[0]: float(line.split(" ")[1]) for line in httpx.get(f"{server.url}/metrics").text
                .splitlines() if line.startswith(("fedshop_score_batches_total", "fedshop_batched_requests_total"))}
    assert counters["fedshop_batched_requests_total"] > counters["fedshop_score_batches_total"]  # 4 clients: shared
    bad = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(assets[0] / "missing")})
    assert bad.status_code == 422 and "not a Hugging Face model directory" in bad.json()["error"]
    assert httpx.get(f"{server.url}/healthz").json()["model_version"] == new
    httpx.post(f"{server.url}/admin/model", json={"model_dir": str(model_a)}, timeout=120)


def test_bad_model_dir_or_catalog_fails_fast_with_one_line(assets, tmp_path):
    root, model_a, _, catalog = assets
    proc = run_cli("serving", [f"serving.model_dir={tmp_path}", f"serving.catalog={catalog}",
                               f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 2 and "not a Hugging Face model directory" in proc.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("id,title,price\np1,shoe,free\n")
    proc = run_cli("serving", [f"serving.model_dir={model_a}", f"serving.catalog={bad}",
                               f"hydra.run.dir={tmp_path}/run2"], tmp_path)
    assert proc.returncode == 2 and "row 2: column 'price' must be a number" in proc.stderr


# ---------------------------------------------------------------- compressed forms


@pytest.fixture(scope="module")
def teacher(assets):
    """A tiny model trained briefly on the built-in relevance data (its scores are not uniform)."""
    import datasets

    from common.run.config import compose
    from common.tasks import data as D
    from common.tasks import model as M
    from common.tasks import train as T

    cfg = compose(["task=relevance",
                   "model=tiny", "finetune=full", *CATALOG_ARGS, "train.progress=false", "train.lr=1e-3",
                   "train.num_threads=1"])
    fd = D.prepare(cfg)
    tokenizer = M.load_tokenizer(cfg.model)
    model = M.build_model(cfg.model, fd.labels, 0, cfg.finetune)
    T.train(model, M.tokenize(datasets.concatenate_datasets(fd.train), tokenizer, 64), tokenizer, cfg.train, 2, 0)
    out = assets[0] / "teacher"
    M.save_final(model, tokenizer, fd.labels, out)
    return out


def test_int8_agrees_with_fp32_on_the_test_set(assets, teacher):
    """Argmax agreement >= 99% and close probabilities (a briefly trained tiny model often predicts one class,
    so the probabilities carry the check; bench/serve_latency.py measures agreement for the MiniLM teacher)."""
    import numpy as np

    from serving.compress import load_judgements, quality
    from serving.ranker import Ranker

    catalog = load_catalog(assets[3])
    judged = load_judgements(assets[0] / "data" / "queries.jsonl")
    fp32, int8 = Ranker(teacher, "fp32"), Ranker(teacher, "int8")
    _, a = quality(fp32, catalog, judged)
    _, b = quality(int8, catalog, judged)
    assert len(a) >= 50 and (a == b).mean() >= 0.99
    pairs = [(e["query"], catalog.by_id[pid].title) for e in judged for pid in e["judgements"]]
    p32 = np.concatenate([fp32.probabilities(q, [t]) for q, t in pairs])
    p8 = np.concatenate([int8.probabilities(q, [t]) for q, t in pairs])
    assert p32.std(axis=0).max() > 1e-4  # the scores vary across pairs
    assert np.abs(p32 - p8).max() < 0.05


def test_onnx_int8_form_matches_fp32_and_serves(server, assets, teacher, tmp_path):
    import shutil

    import numpy as np

    from serving.compress import load_judgements, quality
    from serving.ranker import Ranker

    model_dir = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    catalog = load_catalog(assets[3])
    judged = load_judgements(assets[0] / "data" / "queries.jsonl")
    fp32, onnx = Ranker(model_dir, "fp32"), Ranker(model_dir, "onnx-int8")
    assert (model_dir / "onnx" / "model.int8.onnx").is_file() and onnx.size_mb() < fp32.size_mb()
    _, a = quality(fp32, catalog, judged)
    _, b = quality(onnx, catalog, judged)
    assert (a == b).mean() >= 0.99
    q, titles = judged[0]["query"], [catalog.by_id[pid].title for pid in judged[0]["judgements"]]
    assert np.abs(fp32.probabilities(q, titles) - onnx.probabilities(q, titles)).max() < 0.05
    # The fp32 export computes what torch computes, on a padded batch of different lengths.
    exported = Ranker(model_dir, "onnx")
    mixed = ["mug", "Aurora large blue ceramic coffee mug with a lid, gift box", "a lamp for the desk"]
    np.testing.assert_allclose(exported.probabilities("blue mug", mixed), fp32.probabilities("blue mug", mixed),
                               atol=1e-4)
    swap = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(model_dir), "form": "onnx-int8"},
                      timeout=120)
    assert swap.status_code == 200, swap.text
    r = httpx.post(f"{server.url}/rank", json={"query": "desk lamp", "candidates": catalog_ids(assets, 10), "k": 3})
    assert r.status_code == 200 and r.json()["model_version"].endswith("-onnx-int8")
    httpx.post(f"{server.url}/admin/model", json={"model_dir": str(assets[1]), "form": "fp32"}, timeout=120)


def test_layer_dropped_student_distils_loads_and_serves(server, assets, teacher):
    from common.run.config import compose
    from serving.compress import distill, keep_layers
    from serving.ranker import Ranker

    student = keep_layers(teacher, [1], assets[0] / "student")
    assert Ranker(student).model.config.num_hidden_layers == 1
    pairs = [("red shoes", p.title) for p in load_catalog(assets[3]).products[:64]]
    stats = distill(Ranker(teacher), student, pairs, compose(["task=relevance"]).serving.compress, 0)
    assert stats["distill_pairs"] == 64 and stats["distill_kl"] >= 0.0
    swap = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(student), "form": "int8"}, timeout=120)
    assert swap.status_code == 200, swap.text
    r = httpx.post(f"{server.url}/rank", json={"query": "desk lamp", "candidates": catalog_ids(assets, 10), "k": 3})
    assert r.status_code == 200 and r.json()["model_version"] == swap.json()["model_version"]
    assert r.json()["model_version"].endswith("-int8")
    httpx.post(f"{server.url}/admin/model", json={"model_dir": str(assets[1]), "form": "fp32"}, timeout=120)


def test_int8_mixed_keeps_the_chosen_layers_fp32_and_reaches_the_agreement_target(assets, teacher, tmp_path):
    import shutil

    import torch

    from common.tasks.encoder import Encoder
    from serving.compress import choose_fp32_layers, unlabeled_pairs
    from serving.ranker import Ranker

    catalog = load_catalog(assets[3])
    queries = (assets[0] / "data" / "query_log.txt").read_text().split("\n")[:20]
    from common.tasks.model import minilm_path

    pairs = unlabeled_pairs(catalog, [q for q in queries if q], Encoder(minilm_path()), 8, 0)
    found = choose_fp32_layers(teacher, pairs, 64, 1.0)
    last = found["search"][-1]
    assert last["fp32_layers"] == found["fp32_layers"]
    assert last["agreement"] >= 1.0 or len(found["fp32_layers"]) == Ranker(teacher).model.config.num_hidden_layers
    mixed = Ranker(teacher, "int8", fp32_layers=[0])
    fp32 = {n: type(m) is torch.nn.Linear for n, m in mixed.model.named_modules() if n.endswith(("dense", "query"))}
    assert [n for n, kept in fp32.items() if kept] == [n for n in fp32 if ".layer.0." in n] != []
    assert mixed.version.endswith("-int8-fp32layers0")
    with pytest.raises(FedshopError, match="int8_fp32_layers"):
        Ranker(teacher, "int8", fp32_layers=[7])
    # ONNX Runtime: the chosen layers' nodes are left fp32 (a separate, larger file).
    model_dir = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    whole, part = Ranker(model_dir, "onnx-int8"), Ranker(model_dir, "onnx-int8", fp32_layers=[0])
    assert part.onnx_path.name == "model.int8-fp32_0.onnx" and part.size_mb() > whole.size_mb()
    q, titles = "desk lamp", [p.title for p in catalog.products[:8]]
    assert torch.allclose(torch.tensor(part.probabilities(q, titles)),
                          torch.tensor(Ranker(model_dir, "fp32").probabilities(q, titles)), atol=0.05)


def test_ffn_pruning_is_structured_and_exact_at_full_width(assets, teacher, tmp_path):
    import numpy as np

    from serving.compress import keep_layers, prune_ffn
    from serving.ranker import Ranker

    pairs = [("red shoes", p.title) for p in load_catalog(assets[3]).products[:32]]
    full = Ranker(teacher).model.config.intermediate_size
    same = keep_layers(teacher, [0, 1], tmp_path / "same")
    prune_ffn(same, full, pairs, 64)  # keeping every neuron (reordered by index) changes nothing
    titles = [t for _, t in pairs]
    np.testing.assert_allclose(Ranker(same).probabilities("red shoes", titles),
                               Ranker(teacher).probabilities("red shoes", titles), atol=1e-5)
    half = keep_layers(teacher, [0, 1], tmp_path / "half")
    assert prune_ffn(half, full // 2, pairs, 64) == {"intermediate_size": full // 2, "teacher_intermediate_size": full}
    narrow = Ranker(half)
    assert narrow.model.config.intermediate_size == full // 2
    assert narrow.model.bert.encoder.layer[0].intermediate.dense.weight.shape[0] == full // 2
    assert narrow.size_mb() < Ranker(teacher).size_mb()
    with pytest.raises(FedshopError, match="student_intermediate_size"):
        prune_ffn(half, full, pairs, 64)


class _BlockingRanker:
    """Stands in for a Ranker: score_many waits until released, and records each batch it got."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[Any]:
        import numpy as np

        self.release.wait(10)
        self.batches.append([q for q, _ in requests])
        if any(q == "boom" for q, _ in requests):
            raise RuntimeError("scoring failed")
        return [np.full(len(titles), float(len(q))) for q, titles in requests]

    def score(self, query: str, titles: list[str]) -> Any:
        return self.score_many([(query, titles)])[0]


def test_micro_batcher_scores_queued_requests_together_and_keeps_them_apart():
    from concurrent.futures import ThreadPoolExecutor

    from serving.batching import MicroBatcher

    ranker, sizes = _BlockingRanker(), list[int]()
    batcher = MicroBatcher(4, sizes.append)
    queries = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(batcher.score, ranker, q, ["t"] * (i + 1)) for i, q in enumerate(queries)]
        time.sleep(0.3)  # the first request is being scored; the other five queue behind it
        ranker.release.set()
        results = [f.result(timeout=10) for f in futures]
    for q, (i, r) in zip(queries, enumerate(results), strict=True):
        assert r.tolist() == [float(len(q))] * (i + 1)  # every request gets its own scores back
    assert sorted(sizes, reverse=True)[0] == 4 and sum(sizes) == 6  # at most max_requests per pass
    other = _BlockingRanker()
    other.release.set()
    with pytest.raises(RuntimeError, match="scoring failed"):
        batcher.score(other, "boom", ["t"])
    assert batcher.score(other, "fine", ["t"]).tolist() == [4.0]  # the thread survived the error
    off = MicroBatcher(1)
    assert off.score(other, "xy", ["t", "u"]).tolist() == [2.0, 2.0]


def test_hnsw_index_finds_what_exact_search_finds():
    import numpy as np

    from serving.index import VectorIndex

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 64))
    vectors = centers[rng.integers(0, 200, 20_000)] + 0.1 * rng.standard_normal((20_000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[rng.integers(0, 20_000, 50)] + 0.05 * rng.standard_normal((50, 64))
    exact, hnsw = VectorIndex(vectors, ann_min=20_001), VectorIndex(vectors, ann_min=20_000, m=16, ef_search=128)
    assert (exact.kind, hnsw.kind) == ("exact", "hnsw")
    q = queries[0].astype(np.float32)
    assert exact.search(q, 5) == np.argsort(-(vectors @ q), kind="stable")[:5].tolist()
    recall = np.mean([len(set(exact.search(x, 100)) & set(hnsw.search(x, 100))) / 100 for x in queries])
    assert recall >= 0.95
    assert exact.search(q, 0) == [] and len(exact.search(q, 10 ** 6)) == 20_000


def test_pair_encoder_matches_the_tokenizer_and_falls_back_when_truncating(assets):
    import numpy as np

    from common.run.config import compose
    from common.tasks import model as M
    from serving.ranker import PairEncoder

    tokenizer = M.load_tokenizer(compose(["task=relevance"]).model)  # MiniLM's BERT tokenizer
    encoder = PairEncoder(tokenizer, 64)
    assert encoder.fast
    titles = [p.title for p in load_catalog(assets[3]).products[:200]]
    queries = ["red running shoes", "Café crème 2-pack", "desk lamp"] * 67
    for _ in range(2):  # cold, then from the cache
        got = encoder(queries[:len(titles)], titles)
        want = tokenizer(queries[:len(titles)], titles, truncation=True, max_length=64, padding=True,
                         return_tensors="np")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(got[key], want[key])
    long = ["word " * 100]
    got = encoder(["a query"], long)
    assert got["input_ids"].shape == (1, 64)
    np.testing.assert_array_equal(got["input_ids"], tokenizer(["a query"], long, truncation=True, max_length=64,
                                                             return_tensors="np")["input_ids"])
