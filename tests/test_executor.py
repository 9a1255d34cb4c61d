"""The merchant's task executor (client/executor): resident workers' bookkeeping, without a SuperNode."""

from __future__ import annotations

import logging
import multiprocessing
import os

from client.executor.__main__ import ForkServerExecutor, Worker


def bare_executor() -> ForkServerExecutor:
    """An executor without its fork server (only the bookkeeping is under test)."""
    ex = ForkServerExecutor.__new__(ForkServerExecutor)
    ex.resident, ex.running, ex.workers = True, [], []
    return ex


def answer_then_exit(conn, ok: bool | None) -> None:
    """A stand-in worker: sends `ok` for its task (nothing when None), then exits, closing its end."""
    if ok is not None:
        conn.send(ok)
    os._exit(0)


def worker(ok: bool | None) -> Worker:
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=answer_then_exit, args=(theirs, ok))
    proc.start()
    theirs.close()
    proc.join(10)
    return Worker(proc, ours, "f" * 64, task_id=7, started=0.0)


def test_a_worker_that_answered_is_kept_and_one_that_died_mid_task_is_dropped(caplog):
    ex = bare_executor()
    answered, died = worker(True), worker(None)
    ex.workers = [answered, died]
    with caplog.at_level(logging.INFO, logger="fedshop.executor"):
        ex.reconcile()  # a dead worker's pipe polls readable and raises on recv: that must not stop the loop
    assert answered.task_id is None and "task 7: completed" in caplog.text
    assert died not in ex.workers and "exited with status 0 during task 7" in caplog.text
