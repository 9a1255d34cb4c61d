"""The HTTP API: POST /rank, GET /healthz, GET /metrics, POST /admin/model (swap without dropping requests)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from common.run.config import ServingConfig
from common.run.errors import FedshopError
from common.tasks.encoder import Encoder, retriever_path
from serving.batching import MicroBatcher
from serving.catalog import Catalog
from serving.index import Index
from serving.metrics import Metrics
from serving.ranker import Ranker
from serving.rules import Ranked, Rules, rerank

log = logging.getLogger(__name__)


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


class Service:
    """What the app serves; the ranker reference is swapped atomically, in-flight requests keep theirs."""

    def __init__(self, cfg: ServingConfig, catalog: Catalog, ranker: Ranker, index: Index | None) -> None:
        self.cfg, self.catalog, self.ranker, self.index = cfg, catalog, ranker, index
        r = cfg.rules
        self.rules = Rules(out_of_stock_penalty=r.out_of_stock_penalty, margin_weight=r.margin_weight,
                           promotion_boost=r.promotion_boost, price_min=r.price_min, price_max=r.price_max,
                           max_per_category=r.max_per_category)
        self.metrics = Metrics()
        self.metrics.model_version = ranker.version
        self.batcher = MicroBatcher(cfg.batch_max_requests, self.metrics.observe_batch)
        self.swap_lock = threading.Lock()

    def rank(self, req: RankRequest) -> dict[str, Any]:
        """Validate, retrieve (when no candidates), score, re-rank."""
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
        ranker = self.ranker
        if req.candidates is not None:
            if not req.candidates:
                raise HTTPError(422, "candidates must not be empty (omit it to retrieve from the catalog)",
                                field="candidates")
            if len(req.candidates) > cfg.max_candidates:
                raise HTTPError(413, f"{len(req.candidates)} candidates, more than {cfg.max_candidates}",
                                field="candidates")
            unknown = [c for c in dict.fromkeys(req.candidates) if c not in self.catalog.by_id]
            if unknown:
                raise HTTPError(404, f"{len(unknown)} candidate id(s) not in the catalog", unknown_ids=unknown[:20])
            products = [self.catalog.by_id[c] for c in dict.fromkeys(req.candidates)]
            retrieved = False
        else:
            if self.index is None:
                raise HTTPError(422, "this service has no retrieval index; pass candidates", field="candidates")
            products = [self.catalog.products[i] for i in self.index.search(query, cfg.retrieve_top_n)]
            retrieved = True
        scores = self.batcher.score(ranker, query, [p.title for p in products])
        rules = replace(self.rules,
                        price_min=_tighter(self.rules.price_min, req.price_min, max),
                        price_max=_tighter(self.rules.price_max, req.price_max, min))
        top, filtered = rerank([Ranked(p, float(s)) for p, s in zip(products, scores, strict=True)], rules, k)
        return {"query": query, "k": k, "model_version": ranker.version, "retrieved": retrieved,
                "results": [r.to_json(i + 1) for i, r in enumerate(top)], "filtered": filtered}

    def swap(self, model_dir: str, form: str | None, fp32_layers: list[int] | None = None) -> dict[str, Any]:
        """Load and warm a new model beside the current one, then switch; a failed load changes nothing."""
        with self.swap_lock:
            old = self.ranker
            try:
                new = Ranker(model_dir, form or old.form, self.cfg.max_length, self.cfg.gains,
                             old.fp32_layers if fp32_layers is None else fp32_layers, self.cfg.fallback_gains)
            except FedshopError as exc:
                raise HTTPError(422, str(exc), field="model_dir") from exc
            self.ranker = new
            self.metrics.model_version = new.version
            self.metrics.model_swaps += 1
            log.info("model swapped: %s -> %s (%s)", old.version, new.version, new.model_dir)
            return {"previous": old.version, "model_version": new.version, "model_dir": str(new.model_dir)}


def _tighter(base: float | None, asked: float | None, pick: Callable[[float, float], float]) -> float | None:
    if base is None:
        return asked
    return base if asked is None else pick(base, asked)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application around a loaded Service."""
    app = FastAPI(title="fedshop ranking", docs_url=None, redoc_url=None)
    app.state.service = service
    timeout = service.cfg.request_timeout

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in {"/rank", "/healthz", "/metrics", "/admin/model"} \
            else "other"
        service.metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
        return response

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
    async def rank(req: RankRequest) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(service.rank, req), timeout)
        except TimeoutError:
            raise HTTPError(504, f"ranking took longer than {timeout} s") from None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": service.ranker.version, "form": service.ranker.form,
                "catalog_size": len(service.catalog),
                "retrieval": service.index.kind if service.index is not None else None}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/model")
    async def swap(req: ModelSwap) -> dict[str, Any]:
        return await asyncio.to_thread(service.swap, req.model_dir, req.form, req.int8_fp32_layers)

    return app


def load_service(cfg: ServingConfig) -> Service:
    """Load catalog, ranker and (unless disabled) the retrieval index; raises FedshopError on bad input."""
    from serving.catalog import load_catalog

    if not cfg.model_dir:
        raise FedshopError("serving.model_dir: the model directory to serve is required")
    if not cfg.catalog:
        raise FedshopError("serving.catalog: the product catalog file is required")
    catalog = load_catalog(cfg.catalog)
    ranker = Ranker(cfg.model_dir, cfg.form, cfg.max_length, cfg.gains, cfg.int8_fp32_layers, cfg.fallback_gains)
    retriever = retriever_path(cfg.retriever)
    index = Index(Encoder(retriever, cfg.max_length), catalog, cfg.ann_min_products, cfg.ann_m, cfg.ann_ef_search)
    return Service(cfg, catalog, ranker, index)
