"""Flower's strategies built from conf/, and the Aggregator: the strategy chain behind reply validation.

The Aggregator hands Flower's strategies a view of each valid reply (the exchanged arrays and the training
metrics, weighted by the example count, or by 1 under a DP preset) and returns a typed round report; the
replies themselves are never changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, overload

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common.protocol import wire
from common.run.config import FedshopConfig, StrategyConfig
from server import flower_patches
from server.grid import payload_bytes
from server.privacy import Private
from server.report import DECLINED, Dropped, Evaluated, EvaluateResult, Replied, TrainReport, TrainResult

log = logging.getLogger(__name__)


def _set(value: float | int | None) -> Any:
    """A field of the chosen strategy: common.run.config.validate() has refused the config if it is null."""
    assert value is not None
    return value


def _view(content: RecordDict, reply: Message) -> Message:
    """A message with `reply`'s metadata (sender, round) and other content: what a Flower strategy is handed."""
    return Message(content=content, metadata=reply.metadata)  # type: ignore[call-overload]


def build_strategy(cfg: StrategyConfig) -> FedAvg:
    """Flower's strategy for strategy.name, weighted by each merchant's number of training examples.

    Every value comes from conf/strategy/ (common/run/config/ has checked that the chosen strategy's are set).
    """
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes, weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=_set(cfg.beta), **common)
    if cfg.name == "krum":
        return Krum(num_malicious_nodes=_set(cfg.num_malicious_nodes), **common)
    if cfg.name == "multikrum":
        return MultiKrum(num_malicious_nodes=_set(cfg.num_malicious_nodes),
                         num_nodes_to_select=_set(cfg.num_nodes_to_select), **common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=_set(cfg.proximal_mu), **common)
    if cfg.name in ("fedadam", "fedyogi"):
        opt = FedAdam if cfg.name == "fedadam" else FedYogi
        return opt(eta=_set(cfg.eta), eta_l=_set(cfg.eta_l), beta_1=_set(cfg.beta_1), beta_2=_set(cfg.beta_2),
                   tau=_set(cfg.tau), **common)
    if cfg.name == "fedadagrad":
        return FedAdagrad(eta=_set(cfg.eta), eta_l=_set(cfg.eta_l), tau=_set(cfg.tau), **common)
    if cfg.name == "fedavgm":
        return FedAvgM(server_learning_rate=_set(cfg.server_learning_rate), server_momentum=_set(cfg.server_momentum),
                       **common)
    return FedAvg(**common)


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the update: all of (arrays - reference), flattened together."""
    total = 0.0
    for key, arr in arrays.items():
        diff = arr.numpy().astype(np.float64) - reference[key]
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_update(arrays: ArrayRecord, expected: wire.Spec) -> str | None:
    """Why a reply's arrays must not be aggregated (None when they are fine): the exchanged state's names,
    shapes and dtypes, and finite values."""
    if set(arrays.keys()) != set(expected):
        unexpected = sorted(set(arrays.keys()) - set(expected))
        return (f"array names differ from the exchanged state ({len(arrays)} vs {len(expected)} arrays"
                + (f"; not exchanged: {unexpected[:3]})" if unexpected else ")"))
    for key, arr in arrays.items():
        shape, dtype = expected[key]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            return f"{key}: shape {tuple(arr.shape)} dtype {arr.dtype}, expected {shape} {dtype}"
        if not np.isfinite(arr.numpy()).all():
            return f"{key}: contains NaN or Inf"
    return None


def carried_metrics(evaluated: list[Evaluated]) -> MetricRecord | None:
    """Weighted average (by validation examples) of the metrics every merchant reported; None when none did."""
    usable = [e.reply for e in evaluated if e.reply.num_examples > 0]
    if not usable:
        return None
    common = set.intersection(*(set(r.metrics) for r in usable))
    views = [RecordDict({wire.METRICS: MetricRecord({**{k: r.metrics[k] for k in sorted(common)},
                                                     wire.NUM_EXAMPLES: r.num_examples})}) for r in usable]
    return aggregate_metricrecords(views, wire.NUM_EXAMPLES)


@dataclass(frozen=True)
class Sent:
    """What one round's configure_train sent: the messages and the global arrays they carry."""

    server_round: int
    messages: list[Message]
    arrays: ArrayRecord

    @property
    def nodes(self) -> list[int]:
        """The sampled nodes, in sampling order."""
        return [m.metadata.dst_node_id for m in self.messages]

    @cached_property
    def bytes_down(self) -> int:
        """Payload bytes sent to each sampled merchant."""
        return payload_bytes(self.messages[0].content) if self.messages else 0


class Aggregator:
    """Flower's strategy chain behind reply validation; every call returns what happened instead of storing it."""

    def __init__(self, strategy: Strategy, spec: wire.Spec, *, private: bool, min_replies: int,
                 max_update_norm: float | None, wire_dtype: str) -> None:
        self.strategy = strategy
        self.spec = spec  # the exchanged state's names, shapes and dtypes, as the server keeps and aggregates it
        self.wire_dtype = wire_dtype  # what travels, both ways (strategy.wire_dtype)
        self.wire_spec = {k: (shape, wire_dtype) for k, (shape, _) in spec.items()}
        self.private = private  # a DP preset: every update weighs 1 (wire.aggregation_weight)
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm

    @classmethod
    def for_config(cls, strategy: Strategy, spec: wire.Spec, cfg: FedshopConfig) -> Aggregator:
        """The Aggregator the run's config asks for."""
        return cls(strategy, spec, private=cfg.privacy.merchant_level, min_replies=cfg.strategy.min_replies,
                   max_update_norm=cfg.strategy.max_update_norm, wire_dtype=cfg.strategy.wire_dtype)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Sent:
        """Sample merchants and build their train messages (Flower's configure_train), arrays in the wire dtype."""
        messages = self._on_the_wire(self.strategy.configure_train(server_round, arrays, config, grid))
        return Sent(server_round, messages, arrays)

    def _on_the_wire(self, messages: Iterable[Message]) -> list[Message]:
        out, cast = [], {}  # one cast per distinct ArrayRecord (Flower sends every merchant the same one)
        for msg in messages:
            record = msg.content.array_records.get(wire.ARRAYS)
            if record is None or self.wire_dtype == "float32":
                out.append(msg)
                continue
            if id(record) not in cast:
                cast[id(record)] = wire.cast(record, self.wire_dtype)
            out.append(_view(RecordDict({**msg.content, wire.ARRAYS: cast[id(record)]}), msg))
        return out

    def _accept(self, msg: Message, sent: Sent,
                reference: dict[str, np.ndarray] | None) -> tuple[wire.TrainReply, Replied] | Dropped:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return Dropped(node, f"error: {msg.error.reason}")
        try:
            if (declined := wire.Declined.from_content(msg.content)) is not None:
                log.info("round %d: merchant %d declined: %s", sent.server_round, declined.merchant_index,
                         declined.reason)
                return Dropped(node, DECLINED + declined.reason, record_epsilon=declined.record_epsilon)
            reply = wire.TrainReply.from_content(msg.content)
            # SecAgg+: the server built these arrays itself (global state + unmasked mean), in its own dtype.
            problem = check_update(reply.arrays, self.wire_spec if reference is not None else self.spec)
        except wire.WireError as err:
            problem = str(err)
        norm = None if problem or reference is None else update_norm(reply.arrays, reference)
        if norm is not None and self.max_update_norm is not None and norm > self.max_update_norm:
            problem = f"update L2 norm {norm:.4g} exceeds strategy.max_update_norm={self.max_update_norm:g}"
        if problem:
            log.warning("round %d: rejected the update of node %d: %s", sent.server_round, node, problem)
            return Dropped(node, f"rejected: {problem}")
        return reply, Replied(node, reply.merchant_index, reply.num_examples, reply.metrics.get(wire.TRAIN_LOSS),
                              reply.metrics.get(wire.TRAIN_SECONDS), norm, payload_bytes(msg.content), sent.bytes_down,
                              reply.rounds_trained, reply.record_epsilon)

    def aggregate_train(self, sent: Sent, replies: Iterable[Message], *, secure: bool = False) -> TrainResult:
        """Validate each reply and aggregate the valid ones with the strategy chain.

        secure (SecAgg+): every reply carries the same securely aggregated model, so no update norm is taken.
        """
        reference = None if secure else {k: a.numpy() for k, a in sent.arrays.items()}
        replied, dropped, carried, views = [], [], [], []
        for msg in replies:
            accepted = self._accept(msg, sent, reference)
            if isinstance(accepted, Dropped):
                dropped.append(accepted)
                continue
            reply, entry = accepted
            replied.append(entry)
            if (evaluation := wire.carried_evaluation(reply)) is not None:
                carried.append(Evaluated(entry.node, evaluation))
            weight = wire.aggregation_weight(self.private, reply.num_examples)
            view = reply.aggregation_view(weight)
            view[wire.ARRAYS] = self._as_spec(reply.arrays)  # aggregated in the server's dtype (float32)
            views.append((reply.merchant_index, _view(view, msg)))
        answered = {r.node for r in replied} | {d.node for d in dropped}
        dropped += [Dropped(n, "no reply before the round timeout") for n in sent.nodes if n not in answered]
        report = TrainReport(sent.nodes, replied, dropped, carried, sent.bytes_down * len(sent.nodes),
                             sum(r.bytes_up for r in replied))
        if len(views) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than strategy.min_replies=%d", sent.server_round,
                        len(views), self.min_replies)
            return TrainResult(None, None, replace(report, too_few_replies=True, privacy=self.privacy_spent()))
        # A fixed order (merchant, node) makes the floating-point sum, and so the model, reproducible.
        views.sort(key=lambda v: (v[0], v[1].metadata.src_node_id))
        arrays, metrics = self.strategy.aggregate_train(sent.server_round, [m for _, m in views])
        return TrainResult(self._as_spec(arrays), metrics, replace(report, privacy=self.privacy_spent()))

    @overload
    def _as_spec(self, arrays: ArrayRecord) -> ArrayRecord: ...

    @overload
    def _as_spec(self, arrays: None) -> None: ...

    def _as_spec(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Arrays in the exchanged (server) dtypes: a float16 reply before it is averaged, and the aggregate.
        Flower's FedAdam returns float64 for float32 weights (numpy promotes `x + eta * m / (sqrt(v) + tau)`),
        which doubled the download and made every later float32 reply look malformed."""
        if arrays is None or all(a.dtype == self.spec[k][1] for k, a in arrays.items()):
            return arrays
        return wire.to_arrays({k: a.numpy().astype(self.spec[k][1]) for k, a in arrays.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """Sample merchants for federated evaluation (Flower's configure_evaluate), arrays in the wire dtype."""
        return self._on_the_wire(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> EvaluateResult:
        """The merchants' validation metrics, weighted by their validation examples."""
        evaluated: list[tuple[Evaluated, Message]] = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                evaluated.append((Evaluated(msg.metadata.src_node_id, wire.EvaluateReply.from_content(msg.content)),
                                  msg))
            except wire.WireError as err:
                log.warning("round %d: ignored the evaluation of node %d: %s", server_round,
                            msg.metadata.src_node_id, err)
        evaluated.sort(key=lambda em: (em[0].reply.merchant_index, em[0].node))  # a reproducible sum, as in training
        views = [_view(e.reply.aggregation_view(), m) for e, m in evaluated if e.reply.num_examples > 0]
        metrics = self.strategy.aggregate_evaluate(server_round, views) if views else None
        return EvaluateResult(metrics, [e for e, _ in evaluated])

    @property
    def ledger_strategy(self) -> Private | None:
        """The DP wrapper (None without a privacy preset)."""
        return self.strategy if isinstance(self.strategy, Private) else None

    def state(self) -> dict[str, Any]:
        """Strategy state that a resume must restore (server optimiser moments, DP accountant); torch.save-safe."""
        out: dict[str, Any] = dict(flower_patches.server_opt_state(self.strategy))
        if self.ledger_strategy is not None:
            out["privacy"] = self.ledger_strategy.privacy_state()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of state()."""
        moments = {k: v for k, v in state.items() if k != "privacy"}
        flower_patches.load_server_opt_state(self.strategy, moments)
        if "privacy" in state and self.ledger_strategy is not None:
            self.ledger_strategy.load_privacy_state(state["privacy"])

    def privacy_spent(self) -> dict[str, Any] | None:
        """The DP ledger's figures so far (None without a privacy preset)."""
        return self.ledger_strategy.ledger.spent() if self.ledger_strategy is not None else None

    def budget_exhausted(self) -> bool:
        """Whether one more round would exceed privacy.target_epsilon."""
        return self.ledger_strategy is not None and self.ledger_strategy.ledger.would_exceed()
