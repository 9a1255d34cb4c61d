"""The typed round report: what the strategy chain and the secure round return, and its results.json form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from common.protocol import wire

DECLINED = "declined: "  # the start of a Dropped reason for a merchant that declined to train


@dataclass(frozen=True)
class Replied:
    """A training reply that was aggregated."""

    node: int
    merchant_index: int
    num_examples: int
    train_loss: float | None
    train_seconds: float | None
    update_norm: float | None  # None under SecAgg+: the server never sees one update
    bytes_up: int
    bytes_down: int
    rounds_trained: int  # as the merchant's own state (Context.state) counts them
    record_epsilon: float | None = None  # privacy=example: what the merchant has spent on its records so far


@dataclass(frozen=True)
class Dropped:
    """A sampled merchant whose update was not aggregated, and why."""

    node: int
    reason: str
    bytes_up: int | None = None  # SecAgg+ counts what a lost merchant still sent and received
    bytes_down: int | None = None
    record_epsilon: float | None = None  # a merchant that declined (privacy=example): what it has spent

    @property
    def declined(self) -> bool:
        """The merchant answered but chose not to train (its record-level budget)."""
        return self.reason.startswith(DECLINED)

    def as_json(self) -> dict[str, Any]:
        """results.json's form (byte counts only when counted)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Evaluated:
    """One merchant's validation metrics of a global model."""

    node: int
    reply: wire.EvaluateReply

    def as_json(self) -> dict[str, Any]:
        """results.json's form: node, the metrics, the example count and the merchant index."""
        return {"node": self.node, **self.reply.as_record()}


@dataclass(frozen=True)
class SecureStages:
    """A SecAgg+ round: the protocol's parameters, its stages (seconds, replies) and what survived."""

    protocol: dict[str, float | int]  # num_shares, threshold, max_weight ({} when it halted before setup)
    survivors: int
    clipped_values: int
    stages: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """results.json's form."""
        return {**self.protocol, "survivors": self.survivors, "clipped_values": self.clipped_values,
                "stages": self.stages}


@dataclass(frozen=True)
class TrainReport:
    """One training attempt of a round."""

    sampled: list[int]
    replied: list[Replied] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    pre_evaluated: list[Evaluated] = field(default_factory=list)  # carried by the train replies
    bytes_down_total: int = 0
    bytes_up_total: int = 0
    too_few_replies: bool = False
    secure_aggregation: SecureStages | None = None
    privacy: dict[str, Any] | None = None  # the DP ledger after this round

    def attempt_json(self, names: dict[int, str]) -> dict[str, Any]:
        """A retried attempt, as results.json's `earlier_attempts` lists it."""
        return {"replied": len(self.replied), "dropped": [_named(d.as_json(), names) for d in self.dropped]}


@dataclass(frozen=True)
class TrainResult:
    """The aggregate of a training round (None when nothing usable arrived) and its report."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    report: TrainReport


@dataclass(frozen=True)
class EvaluateResult:
    """Federated evaluation: the aggregated metrics (None when no merchant had validation data) and who."""

    metrics: MetricRecord | None
    evaluated: list[Evaluated]


def _named(entry: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    return {**entry, "merchant": names.get(entry["node"], f"node {entry['node']}")}


def evaluation_json(evaluated: list[Evaluated], names: dict[int, str]) -> list[dict[str, Any]]:
    """results.json's `evaluated` list."""
    return [_named(e.as_json(), names) for e in evaluated]


def record_privacy(report: TrainReport, names: dict[int, str], before: dict[str, float],
                   delta: float) -> dict[str, Any]:
    """privacy=example after a round: every merchant's epsilon on its own records (the latest it reported; those
    not sampled keep theirs), the largest, and who declined for its budget (sorted)."""
    spent = dict(before)
    for node, eps in [(r.node, r.record_epsilon) for r in report.replied] + \
            [(d.node, d.record_epsilon) for d in report.dropped]:
        if eps is not None:
            spent[names.get(node, f"node {node}")] = eps
    declined = sorted(names.get(d.node, f"node {d.node}") for d in report.dropped if d.declined)
    return {"preset": "example", "delta": delta, "merchants": dict(sorted(spent.items())),
            "epsilon_max": max(spent.values(), default=0.0), "declined": declined}


def round_json(rnd: int, server: dict[str, Any], result: TrainResult, attempts: list[TrainReport],
               evaluation: EvaluateResult | None, names: dict[int, str], seconds: float) -> dict[str, Any]:
    """One round of results.json."""
    report = result.report
    record: dict[str, Any] = {
        "round": rnd, "server": server, "train": dict(result.metrics or {}),
        "evaluate": dict(evaluation.metrics or {}) if evaluation else {},
        "sampled": [_named({"node": n}, names) for n in report.sampled],
        "replied": [_named(asdict(r), names) for r in report.replied],
        "dropped": [_named(d.as_json(), names) for d in report.dropped],
        "evaluated": evaluation_json(evaluation.evaluated, names) if evaluation else [],
        "bytes_down_total": report.bytes_down_total, "bytes_up_total": report.bytes_up_total,
        "attempts": len(attempts) + 1, "seconds": seconds}
    if report.secure_aggregation is not None:
        record["secure_aggregation"] = report.secure_aggregation.as_json()
    if attempts:
        record["earlier_attempts"] = [a.attempt_json(names) for a in attempts]
    if report.privacy is not None:
        record["privacy"] = report.privacy
    return record
