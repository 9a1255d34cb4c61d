"""The federated round loop: Flower strategy calls, server-side evaluation, checkpoints, results, resume.

Flower's Strategy.start has no resume, so the loop is written out here (same order of calls as
Strategy.start) and restarts after the last checkpointed round with the exchanged state, strategy state, RNG
states and the metrics history restored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common.protocol import wire
from common.run import checkpoint as C
from common.run.config import FedshopConfig, training_json
from common.run.errors import FedshopError
from common.run.results import RunLog
from common.run.tracking import open_tracker
from common.tasks import data as D
from common.tasks import exchange
from common.tasks.registry import get_task
from server import flower_patches
from server.grid import MerchantGrid, Roster
from server.live import LivePage, status
from server.privacy import make_private
from server.report import (
    DECLINED,
    EvaluateResult,
    TrainReport,
    TrainResult,
    evaluation_json,
    record_privacy,
    round_json,
)
from server.secagg import SecureRound
from server.strategy import Aggregator, build_strategy, carried_metrics

log = logging.getLogger(__name__)


def connected_merchants(grid: Grid, cfg: FedshopConfig) -> int:
    """Merchants connected once strategy.min_available_nodes are (or round_timeout passed): the DP population."""
    deadline = time.time() + cfg.strategy.round_timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= cfg.strategy.min_available_nodes or time.time() > deadline:
            return max(n, 1)
        time.sleep(1.0)


class Federation:
    """One federated run on a Flower Grid: the global model, its strategy chain, checkpoints and results."""

    def __init__(self, grid: Grid, cfg: FedshopConfig, run_dir: Path, roster: Roster | None = None) -> None:
        self.cfg, self.run_dir, self.cfg_json = cfg, run_dir, training_json(cfg)
        self.task = get_task(cfg)
        test_raw, self.labels = D.load_test(cfg)
        self.wb = self.task.workbench(self.labels)
        self.model = self.wb.model
        self.evaluation = self.task.evaluation(self.wb, test_raw)
        self.base_fingerprint = exchange.fingerprint(self.model)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.grid = MerchantGrid(grid, cfg.strategy.round_timeout, cfg.deploy.poll_interval, self.base_fingerprint,
                                 run_dir / "messages.jsonl" if cfg.deploy.audit_messages else None, roster)
        self.ckpt_dir = run_dir / "checkpoints"
        self.last = C.latest(self.ckpt_dir)
        self.payload = C.load(self.last, self.cfg_json) if self.last is not None else None
        if self.payload is not None and self.payload.get("base_fingerprint") != self.base_fingerprint:
            raise FedshopError(f"checkpoint {self.last}: written for the frozen base "
                               f"{self.payload.get('base_fingerprint')}, but this server's is {self.base_fingerprint}")
        self.aggregator = self._aggregator()
        self.secure = SecureRound(cfg, self.grid, self.aggregator) if cfg.secagg.name == "plus" else None
        tracker = open_tracker(cfg, run_dir, "federated")  # before the page: a tracker that fails leaves no server
        self.live = LivePage(cfg.live.port) if cfg.live.port is not None else None
        if self.live is not None:
            log.info("live page: %s", self.live.url)
        self.connected, self.round_started = 0, time.time()
        meta = {"mode": "federated", "strategy": cfg.strategy.name, "labels": self.labels,
                "test_examples": self.evaluation.num_examples, "evaluation": self.evaluation.describe(),
                "test_digest": D.rows_digest(test_raw), "finetune": cfg.finetune.name,
                "base_fingerprint": self.base_fingerprint, "live_page": self.live.url if self.live else None,
                "title": f"fedshop {cfg.strategy.name}, {cfg.model.name}"}
        self.runlog = RunLog(run_dir, meta, self.payload["history"] if self.payload is not None else None, tracker)

    def _aggregator(self) -> Aggregator:
        cfg, private = self.cfg, self.cfg.privacy.merchant_level
        population = 0
        if private:  # a resumed run keeps the population it was accounted over
            saved = (self.payload or {}).get("strategy_state", {}).get("privacy", {})
            population = int(saved.get("population") or cfg.privacy.population or connected_merchants(self.grid, cfg))
        strategy = make_private(build_strategy(cfg.strategy), cfg.privacy, cfg.strategy, population)
        return Aggregator.for_config(strategy, wire.spec(self.task.exchanged(self.model)), cfg)

    def server_eval(self, weights: dict[str, Any], full: bool = False) -> dict[str, Any]:
        """The global model's metrics on the held-out test set: its round subset, or all of it."""
        self.task.load_exchanged(self.model, weights)
        return self.evaluation(self.model, full)

    def checkpoint(self, rnd: int, weights: dict[str, Any]) -> None:
        """Write round rnd's checkpoint (atomic), then delete those checkpoint.keep_last and best_metric let go."""
        C.save(self.ckpt_dir / f"round_{rnd}.pt", server_round=rnd, weights=weights, config_json=self.cfg_json,
               strategy_state=self.aggregator.state(), history=self.runlog.rounds,
               base_fingerprint=self.base_fingerprint)
        keep = self.cfg.checkpoint
        best: set[int] = set()
        if keep.best_metric:
            best = {C.best_round(self.runlog.rounds, keep.best_metric, keep.best_mode)}
            self.runlog.write(best_checkpoint={"round": min(best), "metric": keep.best_metric,
                                               "mode": keep.best_mode})
        C.prune(self.ckpt_dir, keep.keep_last, best)

    def start(self) -> tuple[ArrayRecord, int]:
        """The global state and the first round to run: after the last checkpoint, or round 0 evaluated."""
        if self.last is not None and self.payload is not None:
            self.aggregator.load_state(self.payload["strategy_state"])
            C.set_rng_state(self.payload["rng"])
            log.info("resuming %s after round %d (checkpoint %s)", self.run_dir, self.payload["round"],
                     self.last.name)
            weights, start = self.payload["weights"], int(self.payload["round"]) + 1
        else:
            weights, start = self.task.exchanged(self.model), 1
            t0 = time.time()
            self.runlog.add({"round": 0, "server": self.server_eval(weights), "seconds": time.time() - t0})
            self.checkpoint(0, weights)
        self.runlog.write(status="running", baselines=self.evaluation.baselines())  # a resumed run's too
        self.show("running", start, "starting")
        return wire.to_arrays(weights), start

    def show(self, state: str, rnd: int, phase: str) -> None:
        """Publish where the run is to the live page (when there is one)."""
        if self.live is None:
            return
        spent = self.privacy_summary()
        self.live.publish(status(self.runlog.rounds, title=str(self.runlog.meta.get("title", "")), state=state,
                                 rnd=rnd, num_rounds=self.cfg.strategy.num_rounds, phase=phase,
                                 connected=self.connected, round_seconds=time.time() - self.round_started,
                                 epsilon=spent.get("epsilon", spent.get("epsilon_max"))))

    def privacy_summary(self) -> dict[str, Any]:
        """results.json's `privacy`: the server's ledger (merchant-level presets), or every merchant's epsilon on
        its own records as the last round reported them (privacy=example); {} without privacy."""
        if self.cfg.privacy.merchant_level:
            return self.aggregator.privacy_spent() or {}
        if not self.cfg.privacy.record_level:
            return {}
        last = next((r["record_privacy"] for r in reversed(self.runlog.rounds) if "record_privacy" in r), None)
        dp = self.cfg.privacy
        return {**(last or {"preset": "example", "delta": dp.delta, "merchants": {}, "epsilon_max": 0.0}),
                "target_epsilon": dp.target_epsilon, "noise_multiplier": dp.noise_multiplier,
                "clipping_norm": dp.clipping_norm}

    def check_bases(self, reasons: list[str]) -> None:
        """Stop the run when a merchant holds another frozen base: a federation over different bases is void."""
        refusals = [r for r in [*self.grid.refused.values(), *reasons] if wire.BASE_MISMATCH in r]
        if refusals:
            self.runlog.write(status="refused", error=refusals[0])
            raise FedshopError(f"a merchant refused the run: {refusals[0]}")

    def budget_stop(self, rnd: int) -> dict[str, Any] | None:
        """Why the run stops before round rnd (None when it goes on): a DP budget the round would exceed, or
        (privacy=example) every merchant sampled in the last round declined for its own budget."""
        last = self.runlog.rounds[-1]
        if last.get("dropped") and not last.get("replied") and all(
                d["reason"].startswith(DECLINED) for d in last["dropped"]):
            log.warning("stopping before round %d: every sampled merchant declined (its record-level budget, "
                        "privacy.target_epsilon=%g, is spent)", rnd, self.cfg.privacy.target_epsilon)
            return {"reason": "every merchant's record-level privacy budget", "before_round": rnd,
                    "epsilon_spent": last["record_privacy"]["epsilon_max"],
                    "target_epsilon": self.cfg.privacy.target_epsilon, "delta": self.cfg.privacy.delta}
        if not self.aggregator.budget_exhausted():
            return None
        so_far, dp = self.aggregator.privacy_spent() or {}, self.cfg.privacy
        log.warning("stopping before round %d: it would spend more than privacy.target_epsilon=%g (spent so far: "
                    "epsilon=%.4f at delta=%g)", rnd, dp.target_epsilon, so_far.get("epsilon", 0.0), dp.delta)
        return {"reason": "privacy budget", "before_round": rnd, "epsilon_spent": so_far.get("epsilon"),
                "target_epsilon": dp.target_epsilon, "delta": dp.delta}

    def train_round(self, rnd: int, arrays: ArrayRecord) -> tuple[TrainResult, list[TrainReport]]:
        """One round's training, retried while too few valid replies arrive; the result and the failed attempts."""
        config = wire.train_config(self.cfg.strategy.evaluate_with_train, self.base_fingerprint)
        retries = self.cfg.strategy.round_retries
        failed: list[TrainReport] = []
        while True:
            # identifies merchants that joined since: a foreign base stops the run here
            self.connected = len(list(self.grid.get_node_ids()))
            self.check_bases([])
            if self.secure is not None:
                result = self.secure.run(rnd, arrays, config)
            else:
                sent = self.aggregator.configure_train(rnd, arrays, config, self.grid)
                replies = self.grid.send_and_receive(sent.messages, timeout=self.cfg.strategy.round_timeout)
                result = self.aggregator.aggregate_train(sent, replies)
            self.check_bases([d.reason for d in result.report.dropped])
            declined = all(d.declined for d in result.report.dropped) and not result.report.replied
            if not result.report.too_few_replies or len(failed) == retries or declined:  # asking again is futile
                return result, failed
            failed.append(result.report)
            log.warning("round %d: retrying (%d/%d)", rnd, len(failed), retries)

    def evaluate_round(self, rnd: int, arrays: ArrayRecord) -> EvaluateResult:
        """Federated evaluation of the global state by the sampled merchants."""
        messages = self.aggregator.configure_evaluate(rnd, arrays, wire.evaluate_config(self.base_fingerprint),
                                                      self.grid)
        return self.aggregator.aggregate_evaluate(rnd, self.grid.send_and_receive(
            messages, timeout=self.cfg.strategy.round_timeout))

    def run_round(self, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        """Train, evaluate, record and checkpoint round rnd; returns the new global state."""
        t0 = self.round_started = time.time()
        self.show("running", rnd, "training")
        result, failed = self.train_round(rnd, arrays)
        if self.cfg.strategy.evaluate_with_train:
            # These replies evaluated the model they received: the global model of the previous round.
            carried = result.report.pre_evaluated
            self.runlog.update(rnd - 1, evaluate=dict(carried_metrics(carried) or {}),
                               evaluated=evaluation_json(carried, self.grid.names))
        if result.arrays is None:
            log.warning("round %d: no usable update arrived; the global model is unchanged", rnd)
        else:
            arrays = result.arrays
        last = rnd == self.cfg.strategy.num_rounds
        self.show("running", rnd, "evaluating")
        evaluation = self.evaluate_round(rnd, arrays) if last or not self.cfg.strategy.evaluate_with_train else None
        weights = wire.from_arrays(arrays)
        server = self.server_eval(weights, full=last)
        record = round_json(rnd, server, result, failed, evaluation, self.grid.names, time.time() - t0)
        if self.cfg.privacy.record_level:
            record["record_privacy"] = record_privacy(result.report, self.grid.names,
                                                      self.privacy_summary()["merchants"], self.cfg.privacy.delta)
        self.runlog.add(record)
        self.runlog.write(merchants=sorted(set(self.grid.names.values())))
        self.checkpoint(rnd, weights)
        return arrays

    def run(self) -> dict[str, Any]:
        """Run (or resume) strategy.num_rounds rounds, then write the final model; the final server metrics."""
        arrays, start = self.start()
        stopped = None
        for rnd in range(start, self.cfg.strategy.num_rounds + 1):
            if (stopped := self.budget_stop(rnd)) is not None:
                break
            arrays = self.run_round(rnd, arrays)
        if self.runlog.rounds[-1]["server"].get("eval") != "full":  # stopped early: the final model scored in full
            self.runlog.update(self.runlog.rounds[-1]["round"], server=self.server_eval(wire.from_arrays(arrays), True))
        self.task.load_exchanged(self.model, wire.from_arrays(arrays))
        self.task.save(self.wb, self.run_dir / "model", self.run_dir / "adapter")
        final = self.runlog.rounds[-1]["server"]
        extra: dict[str, Any] = {"privacy": self.privacy_summary()} if self.cfg.privacy.name != "none" else {}
        if stopped is not None:
            extra["stopped"] = stopped
        state = "stopped_privacy_budget" if stopped else "completed"
        self.runlog.write(status=state, final=final, **extra)
        self.show(state, self.runlog.rounds[-1]["round"], "done")
        self.runlog.close()
        return dict(final)


def run_federated(grid: Grid, cfg: FedshopConfig, run_dir: Path, roster: Roster | None = None) -> dict[str, Any]:
    """Run (or resume) a federation on `grid` (Flower's patches applied first); the final server metrics."""
    flower_patches.apply()
    federation = Federation(grid, cfg, run_dir, roster)
    try:
        return federation.run()
    except BaseException:
        if federation.runlog.tracker is not None:  # the MLflow run ends FAILED, with what the run directory has
            federation.runlog.tracker.finish(run_dir, "failed")
        raise
    finally:
        if federation.live is not None:
            federation.live.close()
