"""The HTTP API: POST /rank, GET /healthz, GET /metrics, POST /admin/model (swap without dropping requests)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from common.run.config import ServingConfig
from common.run.errors import FedshopError
from common.tasks.encoder import retriever_path
from serving.batching import MicroBatcher
from serving.catalog import Catalog
from serving.embedder import Embedder, model_role, top_agreement
from serving.index import Index, catalog_vectors
from serving.metrics import Metrics
from serving.ranker import Ranker
from serving.rules import Ranked, Rules, rerank

log = logging.getLogger(__name__)
ENCODER_FORM = "onnx"  # a dual encoder's form when serving.form is null: top-10 agreement with fp32 1.000, 3x faster
CACHE_DIR = "catalog_cache"  # inside a writable model directory: its catalog vectors, by catalog digest
AGREEMENT_PRODUCTS = 20_000  # a larger catalog's agreement check retrieves from this many of its products


class RankRequest(BaseModel):
    """Body of POST /rank."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr
    candidates: list[StrictStr] | None = None
    k: StrictInt | None = None
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)


class ModelSwap(BaseModel):
    """Body of POST /admin/model."""

    model_config = ConfigDict(extra="forbid")
    model_dir: StrictStr
    form: StrictStr | None = None
    int8_fp32_layers: list[StrictInt] | None = None


class HTTPError(Exception):
    """An error answered with `status` and {"error": message, ...}."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@dataclass(frozen=True)
class Models:
    """What one request scores with, swapped as one reference: the catalog index under its encoder and the optional
    cross-encoder (None: the encoder's cosine is the model score). `served` is what serving.model_dir is."""

    index: Index
    ranker: Ranker | None
    served: str  # retriever | reranker

    @property
    def version(self) -> str:
        """The served model's version (serving.model_dir's)."""
        return self.ranker.version if self.served == "reranker" and self.ranker is not None \
            else self.index.encoder.version

    def describe(self) -> dict[str, Any]:
        """/healthz's view: the served model, its form, the index and the second stage."""
        enc, ranker = self.index.encoder, self.ranker
        served_form = ranker.form if self.served == "reranker" and ranker is not None else enc.form
        return {"model_version": self.version, "form": served_form,
                "model": "dual encoder" if self.served == "retriever" else "cross-encoder",
                "encoder_version": enc.version, "reranker_version": ranker.version if ranker else None,
                "retrieval": self.index.kind, "index_build_s": round(self.index.vectors.build_seconds, 2)}


class Service:
    """What the app serves; the Models reference is swapped atomically, in-flight requests keep theirs."""

    def __init__(self, cfg: ServingConfig, catalog: Catalog, models: Models) -> None:
        self.cfg, self.catalog, self.models = cfg, catalog, models
        r = cfg.rules
        self.rules = Rules(out_of_stock_penalty=r.out_of_stock_penalty, margin_weight=r.margin_weight,
                           promotion_boost=r.promotion_boost, price_min=r.price_min, price_max=r.price_max,
                           max_per_category=r.max_per_category)
        self.metrics = Metrics()
        self.metrics.model_version = models.version
        self.batcher = MicroBatcher(cfg.batch_max_requests, self.metrics.observe_batch)
        self.query_batcher = MicroBatcher(cfg.query_batch_max_requests, self.metrics.observe_batch)
        self.swap_lock = threading.Lock()

    def rank(self, req: RankRequest) -> dict[str, Any]:
        """Validate, retrieve (when no candidates), score, re-rank."""
        query, k = self._query_and_k(req)
        models = self.models  # one reference for the whole request: never two models' vectors
        asked = self._candidates(req.candidates) if req.candidates is not None else None
        positions, scores = self._scored(models, query, asked)
        products = [self.catalog.products[i] for i in positions]
        rules = replace(self.rules,
                        price_min=_tighter(self.rules.price_min, req.price_min, max),
                        price_max=_tighter(self.rules.price_max, req.price_max, min))
        top, filtered = rerank([Ranked(p, float(s)) for p, s in zip(products, scores, strict=True)], rules, k)
        return {"query": query, "k": k, "model_version": models.version, "retrieved": req.candidates is None,
                "results": [r.to_json(i + 1) for i, r in enumerate(top)], "filtered": filtered}

    def _scored(self, models: Models, query: str, asked: list[int] | None) -> tuple[list[int], np.ndarray]:
        """Catalog positions (the asked ones, else retrieved) and their model scores: the encoder's cosine (the
        query embedded once), or the cross-encoder's expected gain."""
        if models.ranker is None:
            vector = self.query_batcher.run(models.index, models.index.embed_many, query)
            positions = asked if asked is not None else models.index.vectors.search(vector, self.cfg.retrieve_top_n)
            return positions, models.index.scores(vector, positions)
        positions = asked if asked is not None else models.index.search(query, self.cfg.retrieve_top_n)
        titles = [self.catalog.products[i].title for i in positions]
        return positions, self.batcher.score(models.ranker, query, titles)

    def _query_and_k(self, req: RankRequest) -> tuple[str, int]:
        """The stripped query and k, checked against the service's limits."""
        cfg = self.cfg
        query = req.query.strip()
        if not query:
            raise HTTPError(422, "query must not be empty", field="query")
        if len(query) > cfg.max_query_chars:
            raise HTTPError(422, f"query has {len(query)} characters, more than {cfg.max_query_chars}",
                            field="query")
        k = cfg.default_k if req.k is None else req.k
        if not 1 <= k <= cfg.max_k:
            raise HTTPError(422, f"k={k} must be between 1 and {cfg.max_k}", field="k")
        if req.price_min is not None and req.price_max is not None and req.price_min > req.price_max:
            raise HTTPError(422, f"price_min {req.price_min} > price_max {req.price_max}", field="price_min")
        return query, k

    def _candidates(self, candidates: list[str]) -> list[int]:
        """Catalog positions of the requested ids (first occurrence order); 4xx for empty, too many, unknown."""
        if not candidates:
            raise HTTPError(422, "candidates must not be empty (omit it to retrieve from the catalog)",
                            field="candidates")
        if len(candidates) > self.cfg.max_candidates:
            raise HTTPError(413, f"{len(candidates)} candidates, more than {self.cfg.max_candidates}",
                            field="candidates")
        unknown = [c for c in dict.fromkeys(candidates) if c not in self.catalog.by_id]
        if unknown:
            raise HTTPError(404, f"{len(unknown)} candidate id(s) not in the catalog", unknown_ids=unknown[:20])
        return [self.catalog.index[c] for c in dict.fromkeys(candidates)]

    def swap(self, model_dir: str, form: str | None, fp32_layers: list[int] | None = None) -> dict[str, Any]:
        """Load and warm a new model beside the current one (a dual encoder: with the whole catalog embedded and
        indexed), then switch in one assignment; a failed load changes nothing."""
        with self.swap_lock:
            old = self.models
            try:
                new = load_models(replace(self.cfg, model_dir=model_dir, form=form or self.cfg.form,
                                          int8_fp32_layers=self.cfg.int8_fp32_layers if fp32_layers is None
                                          else fp32_layers), self.catalog, old)
            except FedshopError as exc:
                raise HTTPError(422, str(exc), field="model_dir") from exc
            self.models = new
            self.metrics.model_version = new.version
            self.metrics.model_swaps += 1
            log.info("model swapped: %s -> %s (%s)", old.version, new.version, model_dir)
            return {"previous": old.version, "model_version": new.version, "model_dir": str(model_dir)}


def _tighter(base: float | None, asked: float | None, pick: Callable[[float, float], float]) -> float | None:
    if base is None:
        return asked
    return base if asked is None else pick(base, asked)


class Measure:
    """ASGI middleware counting every HTTP request by endpoint and status, with its latency, into Metrics (a plain
    ASGI wrapper: Starlette's BaseHTTPMiddleware costs about a millisecond a request)."""

    ENDPOINTS = frozenset({"/rank", "/healthz", "/metrics", "/admin/model"})

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Pass the request on; observe its status and seconds when the response has gone."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            self.metrics.observe(path if path in self.ENDPOINTS else "other", status[0], time.perf_counter() - t0)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application around a loaded Service."""
    app = FastAPI(title="fedshop ranking", docs_url=None, redoc_url=None)
    app.state.service = service
    timeout = service.cfg.request_timeout

    app.add_middleware(Measure, metrics=service.metrics)

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        body_only = first.get("type") == "json_invalid"  # its loc is ("body", <character offset>)
        where = "body" if body_only else ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}", "field": where},
                            status_code=422)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error: {exc.__class__.__name__}"}, status_code=500)

    @app.post("/rank")
    async def rank(req: RankRequest) -> JSONResponse:
        try:  # a JSONResponse as it is: FastAPI would otherwise re-validate and re-encode the body
            return JSONResponse(await asyncio.wait_for(asyncio.to_thread(service.rank, req), timeout))
        except TimeoutError:
            raise HTTPError(504, f"ranking took longer than {timeout} s") from None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **service.models.describe(), "catalog_size": len(service.catalog)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/model")
    async def swap(req: ModelSwap) -> dict[str, Any]:
        return await asyncio.to_thread(service.swap, req.model_dir, req.form, req.int8_fp32_layers)

    return app


def load_service(cfg: ServingConfig) -> Service:
    """Load catalog, model(s) and the retrieval index; raises FedshopError on bad input."""
    from serving.catalog import load_catalog

    if not cfg.model_dir:
        raise FedshopError("serving.model_dir: the model directory to serve is required")
    if not cfg.catalog:
        raise FedshopError("serving.catalog: the product catalog file is required")
    catalog = load_catalog(cfg.catalog)
    return Service(cfg, catalog, load_models(cfg, catalog))


def load_models(cfg: ServingConfig, catalog: Catalog, current: Models | None = None) -> Models:
    """serving.model_dir as what it is: a dual encoder (its own index; serving.reranker, if set, re-ranks its top
    serving.retrieve_top_n) or a cross-encoder (re-ranking serving.retriever's index). `current`: the models being
    replaced, whose index or cross-encoder a swap of the other kind keeps."""
    assert cfg.model_dir is not None
    if model_role(cfg.model_dir) == "retriever":
        index = encoder_index(cfg, catalog, cfg.model_dir, cfg.form or ENCODER_FORM, cfg.int8_fp32_layers)
        reranker = current.ranker if current is not None and current.served == "retriever" else (
            _ranker(cfg, cfg.reranker, "fp32", []) if cfg.reranker else None)
        return Models(index, reranker, "retriever")
    ranker = _ranker(cfg, cfg.model_dir, cfg.form or "fp32", cfg.int8_fp32_layers)
    if current is not None and current.served == "reranker":
        return Models(current.index, ranker, "reranker")
    return Models(encoder_index(cfg, catalog, str(retriever_path(cfg.retriever)), "fp32", []), ranker, "reranker")


def _ranker(cfg: ServingConfig, model_dir: str, form: str, fp32_layers: list[int]) -> Ranker:
    """A cross-encoder as configured."""
    return Ranker(model_dir, form, cfg.max_length, cfg.gains, fp32_layers, cfg.fallback_gains)


def encoder_index(cfg: ServingConfig, catalog: Catalog, model_dir: str, form: str, fp32_layers: list[int]) -> Index:
    """The catalog index under an encoder in `form`; a compressed form is checked against fp32 first."""
    cache = _cache_dir(cfg, Path(model_dir))
    encoder = Embedder(model_dir, form, cfg.max_length, fp32_layers, cfg.encoder_threads)
    index = Index(encoder, catalog, cfg.ann_min_products, cfg.ann_m, cfg.ann_ef_search, cache)
    if form != "fp32" and not cfg.force_form:
        check_agreement(cfg, catalog, index, cache)
    elif form != "fp32":
        log.warning("serving.form=%s served without measuring its agreement with fp32 (serving.force_form)", form)
    return index


def _cache_dir(cfg: ServingConfig, model_dir: Path) -> Path | None:
    """serving.cache_dir, else <model_dir>/catalog_cache when model_dir is the served, writable serving.model_dir
    (never the default retriever's installed package), else none."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    path = model_dir.expanduser()
    served = cfg.model_dir is not None and Path(cfg.model_dir).expanduser().resolve() == path.resolve()
    return path / CACHE_DIR if served and os.access(path, os.W_OK) else None


def check_agreement(cfg: ServingConfig, catalog: Catalog, index: Index, cache: Path | None) -> float:
    """The compressed form's top-10 agreement with fp32 over the agreement queries, retrieving from the catalog, or
    from AGREEMENT_PRODUCTS of its products spread over it when it is larger (fp32 vectors read from the cache when
    there); below serving.min_agreement a FedshopError."""
    enc = index.encoder
    reference = Embedder(enc.model_dir, "fp32", cfg.max_length)
    rows = np.linspace(0, len(catalog) - 1, min(len(catalog), AGREEMENT_PRODUCTS)).astype(int)
    if len(rows) == len(catalog):
        ref_p, form_p = catalog_vectors(reference, catalog, cache), index.vectors.vectors
    else:
        ref_p = reference.encode([catalog.products[i].title for i in rows], 128)
        form_p = index.vectors.vectors[rows]
    queries = agreement_queries(cfg, catalog)
    score = top_agreement(enc.encode(queries), form_p, reference.encode(queries), ref_p)
    verdict = (f"serving.form={enc.form}: top-10 agreement with fp32 {score:.4f} on {len(queries)} queries over "
               f"{len(rows)} products")
    if score < cfg.min_agreement:
        raise FedshopError(f"{verdict}, below serving.min_agreement={cfg.min_agreement}; serve fp32, or set "
                           f"serving.force_form=true to serve it anyway")
    log.info("%s (serving.min_agreement %s)", verdict, cfg.min_agreement)
    return score


def agreement_queries(cfg: ServingConfig, catalog: Catalog) -> list[str]:
    """serving.agreement_queries (one query per line, or make_catalog's queries.jsonl), else 200 catalog titles
    spread over the catalog."""
    if cfg.agreement_queries:
        path = Path(cfg.agreement_queries).expanduser()
        try:
            lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
        except OSError as exc:
            raise FedshopError(f"serving.agreement_queries={path}: {exc}") from exc
        queries = [str(json.loads(x)["query"]) if x.startswith("{") else x for x in lines]
        if not queries:
            raise FedshopError(f"serving.agreement_queries={path}: no queries")
        return queries
    step = max(1, len(catalog) // 200)
    return [p.title for p in catalog.products[::step]][:200]
