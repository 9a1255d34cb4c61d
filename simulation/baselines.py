"""Baselines on the same data, model and total epochs: centralized training and merchants alone."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.run.config import FedshopConfig
from common.run.results import RunLog
from common.run.tracking import open_tracker
from common.tasks import data as D
from common.tasks.base import HeldOut, Workbench, train_seed
from common.tasks.registry import get_task

log = logging.getLogger(__name__)


def _setup(cfg: FedshopConfig) -> tuple[D.FederatedData, Workbench, HeldOut]:
    """The data, the task's workbench (the model every mode starts from) and the held-out evaluation."""
    fd = D.prepare(cfg)
    wb = get_task(cfg).workbench(fd.labels)
    return fd, wb, wb.task.evaluation(wb, fd.test)


def _mean(scores: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    """The weighted mean of every number in the records (per-class dicts and the confusion matrix too); strings
    from the first."""
    out: dict[str, Any] = {}
    for key, value in scores[0].items():
        if isinstance(value, dict):
            out[key] = _mean([s[key] for s in scores], weights)
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = np.average(np.asarray([s[key] for s in scores], dtype=np.float64), axis=0,
                                  weights=weights).tolist()
    return out


def run_centralized(cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """One model trained on the union of all merchants' train splits, num_rounds × local_epochs epochs."""
    fd, wb, evaluation = _setup(cfg)
    task, model = wb.task, wb.model
    pooled = task.tokenize(fd.pooled_train, wb)
    runlog = RunLog(run_dir, {"mode": "centralized", "labels": fd.labels, "train_examples": len(pooled),
                              "test_examples": len(fd.test), "evaluation": evaluation.describe(),
                              "test_digest": D.rows_digest(fd.test), "title": f"fedshop centralized, {cfg.model.name}"},
                    tracker=open_tracker(cfg, run_dir, "centralized"))
    runlog.add({"round": 0, "server": evaluation(model, False), "seconds": 0.0})
    runlog.write(baselines=evaluation.baselines())
    rounds = cfg.strategy.num_rounds
    for rnd in range(1, rounds + 1):
        t0 = time.time()
        metrics = task.train(wb, pooled, cfg.train.local_epochs, train_seed(cfg.seed, rnd),
                             desc=f"centralized round {rnd}")
        runlog.add({"round": rnd, "server": evaluation(model, rnd == rounds), "train": metrics,
                    "seconds": time.time() - t0})
    task.save(wb, run_dir / "model")
    final = runlog.rounds[-1]["server"]
    runlog.write(status="completed", final=final)
    runlog.close()
    return dict(final)


def run_alone(cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """Every merchant trains only on its own shard; each model is scored on the global test set.

    Round 0 is the untrained model every merchant starts from (scored once); the last round holds the
    example-weighted mean over the merchants' full evaluations, and `per_merchant` each merchant's own. Rounds
    between are not scored: ten models' evaluations would cost more than their training. model/ holds the model
    of the largest merchant.
    """
    fd, first, evaluation = _setup(cfg)
    task, sizes = first.task, [len(t) for t in fd.train]
    rounds = cfg.strategy.num_rounds
    start = evaluation(first.model, False)
    finals: list[dict[str, Any]] = []
    seconds = 0.0
    per_merchant: dict[str, dict[str, Any]] = {}
    largest = int(np.argmax(sizes))
    for k, (name, train) in enumerate(zip(fd.names, fd.train, strict=True)):
        wb = replace(first, model=task.build_model(fd.labels, cfg.seed))
        tok = task.tokenize(train, wb)
        t0 = time.time()
        for rnd in range(1, rounds + 1):
            task.train(wb, tok, cfg.train.local_epochs, train_seed(cfg.seed, rnd, k), desc=f"{name} alone round {rnd}")
        seconds += time.time() - t0
        finals.append(evaluation(wb.model, True))
        per_merchant[name] = {**finals[-1], "train_examples": len(train)}
        log.info("%s alone: %s", name, {k2: round(v, 4) for k2, v in finals[-1].items() if isinstance(v, float)})
        if k == largest:
            task.save(wb, run_dir / "model")
    runlog = RunLog(run_dir, {"mode": "alone", "labels": fd.labels, "test_examples": len(fd.test),
                              "evaluation": evaluation.describe(), "baselines": evaluation.baselines(),
                              "test_digest": D.rows_digest(fd.test),
                              "merchants": fd.names, "model": f"largest merchant: {fd.names[largest]}",
                              "title": f"fedshop merchants alone, {cfg.model.name}"},
                    tracker=open_tracker(cfg, run_dir, "alone"))
    runlog.add({"round": 0, "server": start, "seconds": 0.0})
    runlog.add({"round": rounds, "server": _mean(finals, sizes), "seconds": seconds})
    final = runlog.rounds[-1]["server"]
    runlog.write(status="completed", final=final, per_merchant=per_merchant)
    runlog.close()
    return dict(final)
