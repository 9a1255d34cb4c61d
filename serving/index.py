"""Retrieval: top-N catalog products by encoder similarity, exact or through an HNSW graph; the catalog's vectors
are cached on disk per (model version, catalog digest)."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.run.errors import FedshopError
from serving.catalog import Catalog
from serving.embedder import Embedder

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


def catalog_digest(catalog: Catalog) -> str:
    """A hash of what is embedded: every product's id and title, in catalog order."""
    h = hashlib.sha256()
    for p in catalog.products:
        h.update(f"{p.id}\t{p.title}\n".encode())
    return h.hexdigest()[:16]


def cache_path(cache_dir: Path, encoder: Embedder, catalog: Catalog) -> Path:
    """Where the catalog's vectors under this encoder (version, form, max_length) are kept."""
    return cache_dir / f"{encoder.version}-L{encoder.max_length}-{catalog_digest(catalog)}.npy"


def catalog_vectors(encoder: Embedder, catalog: Catalog, cache_dir: Path | None = None,
                    batch_size: int = 128) -> np.ndarray:
    """The catalog's title vectors: loaded from the cache for this (model version, catalog digest) pair, else
    embedded in batches (titles sorted by length, progress logged) and written there atomically."""
    path = cache_path(cache_dir, encoder, catalog) if cache_dir is not None else None
    if path is not None and path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(catalog), encoder.dim):
            log.info("catalog vectors loaded from %s", path)
            return vectors
        log.warning("%s has shape %s, expected %s: embedding again", path, vectors.shape, (len(catalog), encoder.dim))
    vectors = _embed_titles(encoder, [p.title for p in catalog.products], batch_size)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
            np.save(tmp, vectors)
            os.replace(tmp, path)
            log.info("catalog vectors cached in %s", path)
        except OSError as exc:
            log.warning("catalog vectors not cached (%s: %s)", path.parent, exc)
    return vectors


def _embed_titles(encoder: Embedder, titles: list[str], batch_size: int) -> np.ndarray:
    """Unit vectors of titles, embedded shortest first (little padding), in catalog order."""
    order = sorted(range(len(titles)), key=lambda i: len(titles[i]))
    out = np.zeros((len(titles), encoder.dim), dtype=np.float32)
    t0, step = time.perf_counter(), max(batch_size, (len(titles) // 10) // batch_size * batch_size)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = encoder.encode([titles[i] for i in rows], batch_size)
        done = start + len(rows)
        if done % step < batch_size or done == len(order):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log.info("embedding the catalog: %d/%d titles (%.0f%%), %.0f titles/s", done, len(order),
                     100 * done / len(order), rate)
    return out


class Index:
    """Retrieval over a catalog's titles under one encoder: its vectors and the query encoder, never mixed."""

    def __init__(self, encoder: Embedder, catalog: Catalog, ann_min: int, m: int = 32, ef_search: int = 256,
                 cache_dir: Path | None = None) -> None:
        self.encoder = encoder
        self.vectors = VectorIndex(catalog_vectors(encoder, catalog, cache_dir), ann_min, m, ef_search)

    @property
    def kind(self) -> str:
        """exact or hnsw."""
        return self.vectors.kind

    def embed(self, query: str) -> np.ndarray:
        """The query's unit vector under this index's encoder."""
        return self.encoder.encode([query])[0]

    def embed_many(self, queries: list[str]) -> list[np.ndarray]:
        """Several queries' unit vectors in one forward pass."""
        return list(self.encoder.encode(queries))

    def search(self, query: str, n: int) -> list[int]:
        """Catalog positions of the n titles closest to the query."""
        return self.vectors.search(self.embed(query), n)

    def scores(self, query_vector: np.ndarray, positions: list[int]) -> np.ndarray:
        """Cosine of the query with the products at these catalog positions."""
        return self.vectors.vectors[positions] @ query_vector
