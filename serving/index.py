"""Candidate retrieval: top-N catalog products by bi-encoder similarity, exact or through an HNSW graph."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import numpy as np

from common.run.errors import FedshopError
from common.tasks.encoder import Encoder
from serving.catalog import Catalog

log = logging.getLogger(__name__)


class VectorIndex:
    """Inner-product top-N over unit vectors: a dot product with every row below `ann_min` rows, else HNSW."""

    def __init__(self, vectors: np.ndarray, ann_min: int, m: int = 32, ef_search: int = 256) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ef_search = ef_search
        self.hnsw: Any = None
        self._params: Any = None
        self.kind = "exact"
        self.build_seconds = 0.0
        if len(self.vectors) >= ann_min:
            try:
                faiss: Any = importlib.import_module("faiss")
            except ImportError as exc:
                raise FedshopError(f"a catalog of {len(self.vectors)} products (serving.ann_min_products="
                                   f"{ann_min}) needs the faiss-cpu package for its HNSW index") from exc
            t0 = time.perf_counter()
            self.hnsw = faiss.IndexHNSWFlat(self.vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            self.hnsw.hnsw.efConstruction = max(2 * m, 64)
            self.hnsw.add(self.vectors)
            self._params = faiss.SearchParametersHNSW
            self.kind = "hnsw"
            self.build_seconds = time.perf_counter() - t0
            log.info("HNSW index over %d products built in %.1f s", len(self.vectors), self.build_seconds)

    def search(self, query: np.ndarray, n: int) -> list[int]:
        """Row numbers of the n rows closest to `query`, best first (ties by row number)."""
        n = min(n, len(self.vectors))
        if n <= 0:
            return []
        if self.hnsw is None:
            top = np.argpartition(-(self.vectors @ query), n - 1)[:n]
        else:
            params = self._params(efSearch=max(self.ef_search, n))
            _, found = self.hnsw.search(query[None, :].astype(np.float32), n, params=params)
            top = found[0][found[0] >= 0]
        scores = dict(zip(top.tolist(), (self.vectors[top] @ query).tolist(), strict=True))
        return sorted(scores, key=lambda i: (-scores[i], i))


class Index:
    """Retrieval over a catalog's titles, embedded once at start with the bi-encoder."""

    def __init__(self, encoder: Encoder, catalog: Catalog, ann_min: int, m: int = 32, ef_search: int = 256) -> None:
        self.encoder = encoder
        self.vectors = VectorIndex(encoder.encode([p.title for p in catalog.products]), ann_min, m, ef_search)

    @property
    def kind(self) -> str:
        """exact or hnsw."""
        return self.vectors.kind

    def search(self, query: str, n: int) -> list[int]:
        """Catalog positions of the n titles closest to the query."""
        return self.vectors.search(self.encoder.encode([query])[0], n)
