"""Serving the federated dual encoder: retrieval and cosine scores over real HTTP, the catalog-vector cache, a
swap that never mixes two models' vectors, compressed forms held to their top-10 agreement, the second stage."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.run.config import compose
from common.run.errors import FedshopError
from serving.app import RankRequest, agreement_queries, load_models, load_service
from serving.catalog import load_catalog
from serving.embedder import Embedder, model_role, top_agreement
from serving.index import cache_path, catalog_vectors
from serving.ranker import model_version
from tests.test_serving import Server, make_model, make_shop


def make_encoder(out: Path, seed: int) -> Path:
    """A tiny random BERT saved as the dual-encoder task saves its final model."""
    from common.tasks.registry import get_task

    task = get_task(compose(["task=retrieval", "model=tiny", f"seed={seed}"]))
    task.save(task.workbench(["exact", "substitute", "complement", "irrelevant"]), out)
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_serving")
    catalog = make_shop(root)
    return root, make_encoder(root / "enc_a", 1), make_encoder(root / "enc_b", 2), catalog


@pytest.fixture(scope="module")
def server(shop):
    root, enc_a, _, catalog = shop
    s = Server(root, enc_a, catalog, f"serving.cache_dir={root}/cache", "serving.max_candidates=50",
               "serving.rules.out_of_stock_penalty=0")
    yield s
    s.close()


def serving_cfg(shop, **kw):
    root, enc_a, _, catalog = shop
    return replace(compose([]).serving, model_dir=str(enc_a), catalog=str(catalog), cache_dir=str(root / "cache"),
                   **kw)


def cosines(model_dir: Path, catalog: Path, query: str) -> dict[str, float]:
    """Every product's cosine with the query under this encoder, computed here, apart from the service."""
    products = load_catalog(catalog).products
    enc = Embedder(model_dir)
    scores = enc.encode([p.title for p in products]) @ enc.encode([query])[0]
    return {p.id: float(s) for p, s in zip(products, scores, strict=True)}


def test_a_dual_encoder_directory_is_served_as_the_retriever(server, shop):
    _, enc_a, _, catalog = shop
    assert model_role(enc_a) == "retriever" and model_role(make_model(shop[0] / "cross", 3)) == "reranker"
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["model"] == "dual encoder" and health["form"] == "onnx" and health["retrieval"] == "exact"
    assert health["reranker_version"] is None
    r = httpx.post(f"{server.url}/rank", json={"query": "grey sofa", "k": 5})
    assert r.status_code == 200, r.text
    body, truth = r.json(), cosines(enc_a, catalog, "grey sofa")
    assert body["retrieved"] is True and body["model_version"] == health["model_version"]
    best = sorted(truth, key=lambda i: (-truth[i], i))[:5]
    assert [x["id"] for x in body["results"]] == best  # no rules configured: the exact top 5 by cosine
    for x in body["results"]:
        assert x["model_score"] == pytest.approx(truth[x["id"]], abs=1e-4)


def test_candidates_are_scored_by_cosine_and_bad_input_keeps_its_contract(server, shop):
    _, enc_a, _, catalog = shop
    cands = [p.id for p in load_catalog(catalog).products[:20]]
    r = httpx.post(f"{server.url}/rank", json={"query": "desk lamp", "candidates": cands, "k": 20})
    assert r.status_code == 200 and r.json()["retrieved"] is False
    truth = cosines(enc_a, catalog, "desk lamp")
    assert {x["id"] for x in r.json()["results"]} == set(cands)
    for x in r.json()["results"]:
        assert x["model_score"] == pytest.approx(truth[x["id"]], abs=1e-4)
    for body, status, field in [({"query": ""}, 422, "query"), ({"query": "lamp", "candidates": ["nope"]}, 404, None),
                                ({"query": "lamp", "candidates": cands * 3}, 413, "candidates"),
                                ({"query": "lamp", "k": 0}, 422, "k")]:
        bad = httpx.post(f"{server.url}/rank", json=body)
        assert bad.status_code == status and bad.json().get("field") == field, bad.text
    bad = httpx.post(f"{server.url}/rank", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["field"] == "body"
    assert 'fedshop_requests_total{endpoint="/rank",status="404"}' in httpx.get(f"{server.url}/metrics").text


def test_catalog_vectors_are_cached_by_model_version_and_catalog_digest(shop, tmp_path):
    _, enc_a, enc_b, catalog_file = shop
    catalog, enc = load_catalog(catalog_file), Embedder(enc_a)
    first = catalog_vectors(enc, catalog, tmp_path)
    path = cache_path(tmp_path, enc, catalog)
    assert path.is_file() and enc.version in path.name

    def no_encoding(*_: object, **__: object) -> np.ndarray:
        raise AssertionError("a cached catalog was embedded again")

    enc.encode = no_encoding  # type: ignore[method-assign]
    np.testing.assert_array_equal(catalog_vectors(enc, catalog, tmp_path), first)  # a restart: the cache
    other = Embedder(enc_b)
    assert cache_path(tmp_path, other, catalog) != path  # another model: another key
    changed = load_catalog(catalog_file)
    changed.products[0] = replace(changed.products[0], title="a new title")
    assert cache_path(tmp_path, Embedder(enc_a), changed) != path  # another catalog: another key
    np.testing.assert_allclose(first, Embedder(enc_a).encode([p.title for p in catalog.products]), atol=1e-5)


def test_a_swap_under_load_embeds_the_new_catalog_first_and_never_mixes_models(server, shop):
    """Every response is entirely one model's: its scores equal that model's cosines and its ids that model's top
    5; both versions answer; nothing fails; a bad directory changes nothing."""
    _, enc_a, enc_b, catalog = shop
    truth = {f"{model_version(d)}-onnx": cosines(d, catalog, "leather boots") for d in (enc_a, enc_b)}  # the default
    responses: list[httpx.Response] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                responses.append(client.post(f"{server.url}/rank", json={"query": "leather boots", "k": 5}))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    swap = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(enc_b)}, timeout=120)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert swap.status_code == 200, swap.text
    assert {r.status_code for r in responses} == {200}
    seen = set()
    for r in responses:
        body = r.json()
        scores = truth[body["model_version"]]
        seen.add(body["model_version"])
        assert [x["id"] for x in body["results"]] == sorted(scores, key=lambda i: (-scores[i], i))[:5]
        assert all(x["model_score"] == pytest.approx(scores[x["id"]], abs=1e-4) for x in body["results"])
    assert seen == set(truth), seen
    bad = httpx.post(f"{server.url}/admin/model", json={"model_dir": str(shop[0] / "missing")})
    assert bad.status_code == 422 and bad.json()["field"] == "model_dir"
    assert httpx.get(f"{server.url}/healthz").json()["model_version"] == swap.json()["model_version"]
    assert httpx.post(f"{server.url}/admin/model", json={"model_dir": str(enc_a)}, timeout=120).status_code == 200


def test_a_compressed_form_below_min_agreement_is_refused_unless_forced(shop):
    catalog = load_catalog(shop[3])
    models = load_models(serving_cfg(shop, form="int8", min_agreement=0.0), catalog)
    fp32 = Embedder(shop[1])
    queries = agreement_queries(serving_cfg(shop), catalog)
    score = top_agreement(models.index.encoder.encode(queries), models.index.vectors.vectors, fp32.encode(queries),
                          catalog_vectors(fp32, catalog))
    assert 0.9 < score < 1.0  # int8 moves a few of the 2,000 top-10 places of this random model
    with pytest.raises(FedshopError, match=r"serving.form=int8: top-10 agreement with fp32 0\.9\d+ on 200 queries "
                                           r"over \d+ products, below serving.min_agreement=1.0"):
        load_models(serving_cfg(shop, form="int8", min_agreement=1.0), catalog)
    forced = load_models(serving_cfg(shop, form="int8", min_agreement=1.0, force_form=True), catalog)
    assert forced.version.endswith("-int8")


def test_onnx_forms_of_the_encoder_match_fp32(shop):
    texts = ["grey sofa", "running shoes size 10", "a much longer query about a red kettle with a glass lid"]
    fp32 = Embedder(shop[1]).encode(texts)
    np.testing.assert_allclose(Embedder(shop[1], "onnx").encode(texts), fp32, atol=1e-4)
    assert np.min(np.sum(Embedder(shop[1], "onnx-int8").encode(texts) * fp32, axis=1)) > 0.98
    models = load_models(serving_cfg(shop, form="onnx-int8"), load_catalog(shop[3]))
    assert models.describe()["form"] == "onnx-int8"


def test_a_cross_encoder_second_stage_reranks_the_encoders_top_n(shop):
    cross = make_model(shop[0] / "second", 4)
    service = load_service(serving_cfg(shop, reranker=str(cross), retrieve_top_n=20))
    described = service.models.describe()
    assert described["model"] == "dual encoder" and described["reranker_version"].endswith("-fp32")
    out = service.rank(RankRequest(query="grey sofa", k=5))
    retrieved = service.models.index.search("grey sofa", 20)
    ids = {service.catalog.products[i].id for i in retrieved}
    assert {x["id"] for x in out["results"]} <= ids and out["model_version"] == described["model_version"]
    assert service.models.ranker is not None
    ranker_scores = service.models.ranker.score("grey sofa", [x["title"] for x in out["results"]])
    np.testing.assert_allclose([x["model_score"] for x in out["results"]], ranker_scores, atol=1e-5)
