"""Micro-batching: requests that arrive while the model is busy are scored together in one forward pass.

No request waits for a batch to fill: one scoring thread takes everything queued the moment it is free
(up to `max_requests` requests for the same model), so a lone request is scored at once and concurrent
ones share a pass. bench/serve_latency.py measures whether that raises throughput on a machine.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Scorer(Protocol):
    """What the batcher needs of a model (serving.ranker.Ranker is one)."""

    def score(self, query: str, titles: list[str]) -> np.ndarray:
        """Scores of titles for one query."""

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """score() of several requests in one pass."""


@dataclass
class _Job:
    ranker: Scorer
    query: str
    titles: list[str]
    done: Future[np.ndarray] = field(default_factory=Future)


class MicroBatcher:
    """score(ranker, query, titles) from any thread; one daemon thread runs the batched forward passes."""

    def __init__(self, max_requests: int, on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.max_requests, self.on_batch = max_requests, on_batch
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        if max_requests > 1:
            threading.Thread(target=self._run, name="fedshop-batcher", daemon=True).start()

    def score(self, ranker: Scorer, query: str, titles: list[str]) -> np.ndarray:
        """The model scores of `titles` for `query`; blocks until its batch has run."""
        if self.max_requests <= 1:
            return ranker.score(query, titles)
        job = _Job(ranker, query, titles)
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
                (batch if job.ranker is first.ranker else rest).append(job)
            self._queue.extendleft(reversed(rest))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                scores = batch[0].ranker.score_many([(j.query, j.titles) for j in batch])
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets the error; the thread lives on
                for job in batch:
                    job.done.set_exception(exc)
                continue
            self.on_batch(len(batch))
            for job, s in zip(batch, scores, strict=True):
                job.done.set_result(s)
