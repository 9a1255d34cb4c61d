"""The federated round loop: Flower strategy calls, server-side evaluation, checkpoints, results, resume.

Flower's Strategy.start has no resume, so the loop is written out here (same order of calls as
Strategy.start) and restarts after the last checkpointed round with weights, strategy state, RNG
states and the metrics history restored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from client.client_app import EVALUATE_FIRST, from_arrays, to_arrays
from common import checkpoint as C
from common import data as D
from common import model as M
from common import train as T
from common.config import FedshopConfig, training_json
from common.results import RunLog
from server.grid import MerchantGrid
from server.privacy import make_private
from server.secagg import SecureRound
from server.strategy import RecordingStrategy, build_strategy

log = logging.getLogger(__name__)


def connected_merchants(grid: Grid, cfg: FedshopConfig) -> int:
    """Merchants connected once strategy.min_available_nodes are (or round_timeout passed): the DP population."""
    deadline = time.time() + cfg.strategy.round_timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= cfg.strategy.min_available_nodes or time.time() > deadline:
            return max(n, 1)
        time.sleep(1.0)


def run_federated(grid: Grid, cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) cfg.strategy.num_rounds rounds; returns the final server-side metrics."""
    cfg_json = training_json(cfg)
    T.set_seed(cfg.seed)
    T.configure_threads(cfg.train)
    test_raw, labels = D.load_test(cfg)
    tokenizer = M.load_tokenizer(cfg.model)
    model = M.build_model(cfg.model, labels, cfg.seed)
    test = M.tokenize(test_raw, tokenizer, cfg.train.max_length)
    gains = D.label_gains(cfg.data, labels)
    run_dir.mkdir(parents=True, exist_ok=True)
    grid = MerchantGrid(grid, cfg.strategy.round_timeout, cfg.deploy.poll_interval,
                        run_dir / "messages.jsonl" if cfg.deploy.audit_messages else None)
    ckpt_dir = run_dir / "checkpoints"
    last = C.latest(ckpt_dir)
    payload = C.load(last, cfg_json) if last is not None else None
    private = cfg.privacy.name != "none"
    inner = build_strategy(cfg.strategy)
    population = 0
    if private:  # a resumed run keeps the population it was accounted over
        saved = (payload or {}).get("strategy_state", {}).get("privacy", {})
        population = int(saved.get("population") or cfg.privacy.population or connected_merchants(grid, cfg))
    secure = cfg.secagg.name == "plus"
    strategy = RecordingStrategy(make_private(inner, cfg.privacy, cfg.strategy, population),
                                 cfg.strategy.min_replies, cfg.strategy.max_update_norm, secure=secure)
    secure_round = SecureRound(cfg, grid, strategy) if secure else None
    meta = {"mode": "federated", "strategy": cfg.strategy.name, "labels": labels, "test_examples": len(test),
            "title": f"fedshop {cfg.strategy.name}, {cfg.model.name}"}

    def server_eval(weights: dict[str, Any]) -> dict[str, float]:
        M.set_weights(model, weights)
        return T.evaluate(model, test, tokenizer, cfg.train, gains)

    def save_checkpoint(rnd: int, weights: dict[str, Any]) -> None:
        C.save(ckpt_dir / f"round_{rnd}.pt", server_round=rnd, weights=weights, config_json=cfg_json,
               strategy_state=strategy.state(), history=runlog.rounds)

    if last is not None and payload is not None:
        weights, start = payload["weights"], int(payload["round"]) + 1
        strategy.load_state(payload["strategy_state"])
        C.set_rng_state(payload["rng"])
        runlog = RunLog(run_dir, meta, payload["history"])
        log.info("resuming %s after round %d (checkpoint %s)", run_dir, start - 1, last.name)
    else:
        weights, start = M.get_weights(model), 1
        runlog = RunLog(run_dir, meta)
        t0 = time.time()
        runlog.add({"round": 0, "server": server_eval(weights), "seconds": time.time() - t0})
        save_checkpoint(0, weights)
    runlog.write(status="running")
    arrays = to_arrays(weights)
    timeout = cfg.strategy.round_timeout
    piggyback = cfg.strategy.evaluate_with_train

    def merchant(node: int) -> str:
        return grid.names.get(node, f"node {node}")

    stopped: dict[str, Any] | None = None
    for rnd in range(start, cfg.strategy.num_rounds + 1):
        if strategy.budget_exhausted():
            so_far = strategy.privacy_spent() or {}
            stopped = {"reason": "privacy budget", "before_round": rnd, "epsilon_spent": so_far.get("epsilon"),
                       "target_epsilon": cfg.privacy.target_epsilon, "delta": cfg.privacy.delta}
            log.warning("stopping before round %d: it would spend more than privacy.target_epsilon=%g "
                        "(spent so far: epsilon=%.4f at delta=%g)", rnd, cfg.privacy.target_epsilon,
                        so_far.get("epsilon", 0.0), cfg.privacy.delta)
            break
        t0 = time.time()
        attempts = []
        train_config = ConfigRecord({EVALUATE_FIRST: 1} if piggyback else {})
        for attempt in range(cfg.strategy.round_retries + 1):
            strategy.new_round()
            if secure_round is not None:
                agg, train_metrics = secure_round.run(rnd, arrays, train_config)
            else:
                replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, train_config, grid),
                                                timeout=timeout)
                agg, train_metrics = strategy.aggregate_train(rnd, replies)
            attempts.append({"replied": len(strategy.record["replied"]), "dropped": strategy.record["dropped"]})
            if not strategy.record["too_few_replies"]:
                break
            if attempt < cfg.strategy.round_retries:
                log.warning("round %d: retrying (%d/%d)", rnd, attempt + 1, cfg.strategy.round_retries)
        if piggyback:
            # These replies evaluated the model they received: the global model of the previous round.
            for entry in strategy.record["pre_evaluated"]:
                entry["merchant"] = merchant(entry["node"])
            runlog.update(rnd - 1, evaluate=dict(strategy.pre_evaluation() or {}),
                          evaluated=strategy.record["pre_evaluated"])
        if agg is None:
            log.warning("round %d: no usable update arrived; the global model is unchanged", rnd)
        else:
            arrays = agg
        eval_metrics = None
        if not piggyback or rnd == cfg.strategy.num_rounds:
            replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                            timeout=timeout)
            eval_metrics = strategy.aggregate_evaluate(rnd, replies)
        weights = from_arrays(arrays)
        rec = strategy.record
        rec["sampled"] = [{"node": n, "merchant": merchant(n)} for n in rec["sampled"]]
        for entry in rec["replied"] + rec["evaluated"] + rec["dropped"]:
            entry["merchant"] = merchant(entry["node"])
        record = {"round": rnd, "server": server_eval(weights), "train": dict(train_metrics or {}),
                  "evaluate": dict(eval_metrics or {}), "sampled": rec["sampled"], "replied": rec["replied"],
                  "dropped": rec["dropped"], "evaluated": rec["evaluated"],
                  "bytes_down_total": rec.get("bytes_down_total",
                                              rec["bytes_down_per_merchant"] * len(rec["sampled"])),
                  "bytes_up_total": rec.get("bytes_up_total", sum(r["bytes_up"] for r in rec["replied"])),
                  "attempts": len(attempts), "seconds": time.time() - t0}
        if "secure_aggregation" in rec:
            record["secure_aggregation"] = rec["secure_aggregation"]
        if len(attempts) > 1:
            record["earlier_attempts"] = attempts[:-1]
        spent = strategy.privacy_spent()
        if spent is not None:
            record["privacy"] = spent
        runlog.add(record)
        runlog.write(merchants=sorted(set(grid.names.values())))
        save_checkpoint(rnd, weights)
    M.set_weights(model, weights)
    M.save_final(model, tokenizer, labels, run_dir / "model")
    final = runlog.rounds[-1]["server"]
    extra: dict[str, Any] = {"privacy": strategy.privacy_spent()} if private else {}
    if stopped is not None:
        extra["stopped"] = stopped
    runlog.write(status="stopped_privacy_budget" if stopped else "completed", final=final, **extra)
    runlog.close()
    return dict(final)
