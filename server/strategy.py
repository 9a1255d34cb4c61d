"""Strategy factory (Flower's FedAvg / FedProx / FedAdam) and a recording wrapper that validates replies."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from client.client_app import EVAL_PREFIX
from common.config import StrategyConfig
from server.grid import payload_bytes

log = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"
INFO_KEYS = ("merchant-index",)


def _aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted metric average, without the per-merchant bookkeeping keys."""
    out = aggregate_metricrecords(records, weight_key)
    for key in INFO_KEYS:
        out.pop(key, None)
    return out


def split_evaluation(metrics: dict[str, Any]) -> dict[str, Any]:
    """The validation metrics a train reply carries (EVAL_PREFIX keys, prefix removed); {} when none."""
    return {k[len(EVAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}


def build_strategy(cfg: StrategyConfig) -> FedAvg:
    """Flower's strategy for strategy.name, weighted by each merchant's number of training examples."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes, weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=_aggregate_metrics, evaluate_metrics_aggr_fn=_aggregate_metrics)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=0.2 if cfg.beta is None else float(cfg.beta), **common)
    if cfg.name == "krum":
        return Krum(num_malicious_nodes=int(cfg.num_malicious_nodes or 0), **common)
    if cfg.name == "multikrum":
        return MultiKrum(num_malicious_nodes=int(cfg.num_malicious_nodes or 0),
                         num_nodes_to_select=int(cfg.num_nodes_to_select or 1), **common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=float(cfg.proximal_mu or 0.0), **common)
    if cfg.name == "fedadam":
        return FedAdam(eta=float(cfg.eta or 1e-3), eta_l=float(cfg.eta_l or 1e-3), beta_1=float(cfg.beta_1 or 0.9),
                       beta_2=float(cfg.beta_2 or 0.99), tau=float(cfg.tau or 1e-9), **common)
    return FedAvg(**common)


def _weight(reply: RecordDict) -> float:
    value = next(iter(reply.metric_records.values())).get(WEIGHT_KEY)
    return float(value) if isinstance(value, int | float) else 0.0


def _merchant_index(reply: RecordDict) -> float:
    value = next(iter(reply.metric_records.values())).get("merchant-index")
    return float(value) if isinstance(value, int | float) else float("inf")


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the update: all of (arrays - reference), flattened together."""
    total = 0.0
    for key, arr in arrays.items():
        diff = arr.numpy().astype(np.float64) - reference[key]
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_update(reply: RecordDict, expected: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why a training reply must not be aggregated (None when it is fine).

    Checked: one ArrayRecord and one MetricRecord, a positive finite example count, the global model's
    array names, shapes and dtypes, and finite values (the norm bound is checked by RecordingStrategy).
    """
    if len(reply.array_records) != 1 or len(reply.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    metrics = next(iter(reply.metric_records.values()))
    n = metrics.get(WEIGHT_KEY)
    if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(float(n)) or n <= 0:
        return f"missing or invalid {WEIGHT_KEY}={n!r}"
    arrays = next(iter(reply.array_records.values()))
    if set(arrays.keys()) != set(expected):
        return f"array names differ from the global model ({len(arrays)} vs {len(expected)} arrays)"
    for key, arr in arrays.items():
        shape, dtype = expected[key]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            return f"{key}: shape {tuple(arr.shape)} dtype {arr.dtype}, expected {shape} {dtype}"
        if not np.isfinite(arr.numpy()).all():
            return f"{key}: contains NaN or Inf"
    return None


class RecordingStrategy(Strategy):
    """Wraps a Flower strategy: rejects malformed updates and records who was sampled, replied or dropped."""

    def __init__(self, inner: Strategy, min_replies: int = 1, max_update_norm: float | None = None,
                 secure: bool = False) -> None:
        self.inner = inner
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        # secure (SecAgg+): every reply carries the same securely aggregated model, so no per-merchant norm.
        self.secure = secure
        self._global = ArrayRecord()
        self.record: dict[str, Any] = {}
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def new_round(self) -> None:
        """Start a fresh per-round record."""
        self.record = {"sampled": [], "replied": [], "dropped": [], "evaluated": [], "pre_evaluated": [],
                       "bytes_down_per_merchant": 0, "too_few_replies": False}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Delegate, remembering the sampled nodes and the global arrays' shapes."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global = arrays
        self.record["sampled"] = [m.metadata.dst_node_id for m in messages]
        self.record["bytes_down_per_merchant"] = payload_bytes(messages[0].content) if messages else 0
        self.record["t_train_sent"] = time.time()
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, record it, and aggregate the valid ones with the wrapped strategy."""
        valid = []
        reference = {k: a.numpy() for k, a in self._global.items()}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.record["dropped"].append({"node": node, "reason": f"error: {msg.error.reason}"})
                continue
            problem = check_update(msg.content, self._expected)
            norm = None if problem or self.secure else update_norm(next(iter(msg.content.array_records.values())),
                                                                     reference)
            if norm is not None and self.max_update_norm is not None and norm > self.max_update_norm:
                problem = f"update L2 norm {norm:.4g} exceeds strategy.max_update_norm={self.max_update_norm:g}"
            if problem:
                log.warning("round %d: rejected the update of node %d: %s", server_round, node, problem)
                self.record["dropped"].append({"node": node, "reason": f"rejected: {problem}"})
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            self.record["replied"].append({
                "node": node, "merchant_index": metrics.get("merchant-index"),
                "num_examples": metrics.get(WEIGHT_KEY), "train_loss": metrics.get("train-loss"),
                "train_seconds": metrics.get("train-seconds"), "update_norm": norm,
                "bytes_up": payload_bytes(msg.content),
                "bytes_down": self.record["bytes_down_per_merchant"]})
            scores = split_evaluation(metrics)
            if scores:
                self.record["pre_evaluated"].append({"node": node, **scores,
                                                     "merchant-index": metrics.get("merchant-index")})
                # Flower aggregates only replies with identical metric keys; a merchant without validation
                # data reports fewer evaluation keys, so they leave the reply once recorded.
                record = next(iter(msg.content.metric_records.values()))
                for key in [k for k in record if k.startswith(EVAL_PREFIX)]:
                    del record[key]
            valid.append(msg)
        answered = {r["node"] for r in self.record["replied"]} | {d["node"] for d in self.record["dropped"]}
        for node in self.record["sampled"]:
            if node not in answered:
                self.record["dropped"].append({"node": node, "reason": "no reply before the round timeout"})
        if len(valid) < self.min_replies:
            self.record["too_few_replies"] = True
            log.warning("round %d: %d valid replies, fewer than strategy.min_replies=%d", server_round, len(valid),
                        self.min_replies)
            return None, None
        # A fixed order (merchant, node) makes the floating-point sum, and so the model, reproducible.
        valid.sort(key=lambda m: (_merchant_index(m.content), m.metadata.src_node_id))
        return self.inner.aggregate_train(server_round, valid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Delegate federated evaluation sampling."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record which merchants evaluated, then aggregate with the wrapped strategy."""
        replies = [m for m in replies if not m.has_error()]
        for msg in replies:
            metrics = dict(next(iter(msg.content.metric_records.values())))
            self.record["evaluated"].append({"node": msg.metadata.src_node_id, **metrics})
        usable = [m for m in replies if _weight(m.content) > 0]
        return self.inner.aggregate_evaluate(server_round, usable) if usable else None

    def pre_evaluation(self) -> MetricRecord | None:
        """Weighted average of the validation metrics this round's train replies carried (None when none)."""
        entries = [e for e in self.record["pre_evaluated"] if float(e.get(WEIGHT_KEY, 0)) > 0]
        if not entries:
            return None
        common = set.intersection(*({k for k, v in e.items() if isinstance(v, int | float)} for e in entries))
        common -= {"node", "merchant-index"}
        usable = [RecordDict({"m": MetricRecord({k: e[k] for k in sorted(common)})}) for e in entries]
        return _aggregate_metrics(usable, WEIGHT_KEY)

    def state(self) -> dict[str, Any]:
        """Strategy state that a resume must restore (FedAdam moments, DP accountant); torch.save-safe."""
        out: dict[str, Any] = {}
        for key in ("m_t", "v_t"):
            value = getattr(self.inner, key, None)
            if value:
                out[key] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()}
        if hasattr(self.inner, "privacy_state"):
            out["privacy"] = self.inner.privacy_state()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of state()."""
        for key, value in state.items():
            if key == "privacy":
                self.inner.load_privacy_state(value)  # type: ignore[attr-defined]
            else:
                setattr(self.inner, key, {k: v.numpy() for k, v in value.items()})

    def privacy_spent(self) -> dict[str, Any] | None:
        """The DP ledger's figures so far (None without a privacy preset)."""
        ledger = getattr(self.inner, "ledger", None)
        return ledger.spent() if ledger is not None else None

    def budget_exhausted(self) -> bool:
        """Whether one more round would exceed privacy.target_epsilon."""
        ledger = getattr(self.inner, "ledger", None)
        return ledger is not None and ledger.would_exceed()
