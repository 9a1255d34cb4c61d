"""Micro-batching: requests that arrive while the model is busy are computed together in one forward pass.

No request waits for a batch to fill: one thread takes everything queued the moment it is free (up to
`max_requests` requests for the same model), so a lone request runs at once and concurrent ones share a pass.
The cross-encoder batches (query, titles) requests; the dual encoder batches the queries it embeds.
bench/serve_latency.py measures whether that raises throughput on a machine.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Scorer(Protocol):
    """What the batcher needs of a model (serving.ranker.Ranker is one)."""

    def score(self, query: str, titles: list[str]) -> np.ndarray:
        """Scores of titles for one query."""

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """score() of several requests in one pass."""


@dataclass
class _Job:
    model: object  # jobs for the same model share a pass
    many: Callable[[list[Any]], list[Any]]
    item: Any
    done: Future[Any] = field(default_factory=Future)


class MicroBatcher:
    """run(model, many, item) from any thread; one daemon thread runs the batched passes."""

    def __init__(self, max_requests: int, on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.max_requests, self.on_batch = max_requests, on_batch
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        if max_requests > 1:
            threading.Thread(target=self._run, name="fedshop-batcher", daemon=True).start()

    def score(self, ranker: Scorer, query: str, titles: list[str]) -> np.ndarray:
        """The cross-encoder's scores of `titles` for `query`; blocks until its batch has run."""
        if self.max_requests <= 1:
            return ranker.score(query, titles)
        return self.run(ranker, ranker.score_many, (query, titles))

    def run(self, model: object, many: Callable[[list[Any]], list[Any]], item: Any) -> Any:
        """many([item])[0], computed in one call with whatever else is queued for the same model."""
        if self.max_requests <= 1:
            return many([item])[0]
        job = _Job(model, many, item)
        with self._ready:
            self._queue.append(job)
            self._ready.notify()
        return job.done.result()

    def _take(self) -> list[_Job]:
        with self._ready:
            while not self._queue:
                self._ready.wait()
            first = self._queue.popleft()
            batch = [first]
            rest: deque[_Job] = deque()
            while self._queue and len(batch) < self.max_requests:
                job = self._queue.popleft()
                (batch if job.model is first.model else rest).append(job)
            self._queue.extendleft(reversed(rest))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                results = batch[0].many([j.item for j in batch])
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets the error; the thread lives on
                for job in batch:
                    job.done.set_exception(exc)
                continue
            self.on_batch(len(batch))
            for job, r in zip(batch, results, strict=True):
                job.done.set_result(r)
