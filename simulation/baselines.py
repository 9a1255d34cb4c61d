"""Baselines on the same data, model and total epochs: centralized training and merchants alone."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import data as D
from common import model as M
from common import train as T
from common import wire
from common.config import FedshopConfig
from common.results import RunLog
from common.tracking import open_tracker

log = logging.getLogger(__name__)


def _setup(cfg: FedshopConfig) -> tuple[D.FederatedData, Any, Any, list[float] | None]:
    T.set_seed(cfg.seed)
    T.configure_threads(cfg.train)
    fd = D.prepare(cfg)
    tokenizer = M.load_tokenizer(cfg.model)
    test = M.tokenize(fd.test, tokenizer, cfg.train.max_length)
    return fd, tokenizer, test, D.label_gains(cfg.data, fd.labels)


def run_centralized(cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """One model trained on the union of all merchants' train splits, num_rounds × local_epochs epochs."""
    fd, tokenizer, test, gains = _setup(cfg)
    model = M.build_model(cfg.model, fd.labels, cfg.seed, cfg.finetune)
    pooled = M.tokenize(fd.pooled_train, tokenizer, cfg.train.max_length, cfg.data.num_proc)
    runlog = RunLog(run_dir, {"mode": "centralized", "labels": fd.labels, "train_examples": len(pooled),
                              "test_examples": len(fd.test), "test_digest": D.rows_digest(fd.test),
                              "title": f"fedshop centralized, {cfg.model.name}"},
                    tracker=open_tracker(cfg, run_dir, "centralized"))
    runlog.add({"round": 0, "server": T.evaluate(model, test, tokenizer, cfg.train, gains), "seconds": 0.0})
    for rnd in range(1, cfg.strategy.num_rounds + 1):
        t0 = time.time()
        metrics = T.train(model, pooled, tokenizer, cfg.train, cfg.train.local_epochs, cfg.seed * 1_000_003 + rnd,
                          desc=f"centralized round {rnd}")
        runlog.add({"round": rnd, "server": T.evaluate(model, test, tokenizer, cfg.train, gains),
                    "train": metrics, "seconds": time.time() - t0})
    M.save_final(model, tokenizer, fd.labels, run_dir / "model")
    final = runlog.rounds[-1]["server"]
    runlog.write(status="completed", final=final)
    runlog.close()
    return dict(final)


def run_alone(cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """Every merchant trains only on its own shard; each model is scored on the global test set.

    Per round the record holds the example-weighted mean over merchants; `per_merchant` holds each
    merchant's final scores. model/ holds the model of the largest merchant.
    """
    fd, tokenizer, test, gains = _setup(cfg)
    sizes = [len(t) for t in fd.train]
    per_round: list[list[dict[str, float]]] = [[] for _ in range(cfg.strategy.num_rounds + 1)]
    seconds = [0.0] * (cfg.strategy.num_rounds + 1)
    per_merchant: dict[str, dict[str, float]] = {}
    largest = int(np.argmax(sizes))
    for k, (name, train) in enumerate(zip(fd.names, fd.train, strict=True)):
        model = M.build_model(cfg.model, fd.labels, cfg.seed, cfg.finetune)
        tok = M.tokenize(train, tokenizer, cfg.train.max_length)
        per_round[0].append(T.evaluate(model, test, tokenizer, cfg.train, gains))
        for rnd in range(1, cfg.strategy.num_rounds + 1):
            t0 = time.time()
            T.train(model, tok, tokenizer, cfg.train, cfg.train.local_epochs,
                    cfg.seed * 1_000_003 + rnd * 1009 + k, desc=f"{name} alone round {rnd}")
            per_round[rnd].append(T.evaluate(model, test, tokenizer, cfg.train, gains))
            seconds[rnd] += time.time() - t0
        per_merchant[name] = {**per_round[-1][-1], "train_examples": len(train)}
        log.info("%s alone: %s", name, {k2: round(v, 4) for k2, v in per_round[-1][-1].items()})
        if k == largest:
            M.save_final(model, tokenizer, fd.labels, run_dir / "model")
    runlog = RunLog(run_dir, {"mode": "alone", "labels": fd.labels, "test_examples": len(fd.test),
                              "test_digest": D.rows_digest(fd.test),
                              "merchants": fd.names, "model": f"largest merchant: {fd.names[largest]}",
                              "title": f"fedshop merchants alone, {cfg.model.name}"},
                    tracker=open_tracker(cfg, run_dir, "alone"))
    for rnd, scores in enumerate(per_round):
        keys = [k for k in scores[0] if k != wire.NUM_EXAMPLES]
        mean = {k: float(np.average([s[k] for s in scores], weights=sizes)) for k in keys}
        runlog.add({"round": rnd, "server": mean, "seconds": seconds[rnd]})
    final = runlog.rounds[-1]["server"]
    runlog.write(status="completed", final=final, per_merchant=per_merchant)
    runlog.close()
    return dict(final)
