"""The wire protocol between the server and the merchants: every message key, the typed messages, array conversion.

What crosses the network in one round (keys are the constants below):

    server -> merchant  train     {ARRAYS: exchanged state, CONFIG: {SERVER_ROUND, BASE_FINGERPRINT, EVALUATE_FIRST?,
                                                                     PROXIMAL_MU?}}
    merchant -> server  reply     {ARRAYS: trained exchanged state,
                                   METRICS: {NUM_EXAMPLES, MERCHANT_INDEX, ROUNDS_TRAINED, TRAIN_LOSS, TRAIN_SECONDS,
                                             RECORD_EPSILON?, EVAL_PREFIX + validation metric of the received
                                             model ...}}
                        or, declining to train (privacy=example budget), {METRICS: {MERCHANT_INDEX, DECLINED,
                                   RECORD_EPSILON}, INFO: {REASON}}
    server -> merchant  evaluate  {ARRAYS, CONFIG}      reply {METRICS: {NUM_EXAMPLES, MERCHANT_INDEX, loss, ...}}
    server -> merchant  query     {CONFIG: {BASE_FINGERPRINT}}  reply {METRICS: {MERCHANT_INDEX, NUM_EXAMPLES},
                                                               INFO: {MERCHANT_NAME}}

On the way, each message's ArrayRecord of several tensors travels packed (pack / unpack below): one array per
dtype plus a LAYOUT ConfigRecord; the table above is what both ends see after unpacking.

Flower's own strategies read NUM_EXAMPLES (their `weighted_by_key`), ARRAYS and CONFIG; SERVER_ROUND and
PROXIMAL_MU are set by Flower's strategies. Parsers raise WireError naming the key that is wrong; nothing here
mutates a message it is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from common.run.keys import NUM_EXAMPLES as NUM_EXAMPLES
from common.run.keys import TRAIN_LOSS as TRAIN_LOSS
from common.run.keys import TRAIN_SECONDS as TRAIN_SECONDS

TRAIN, EVALUATE, QUERY = MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY

# Records of a message's content.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
INFO = "info"

# Train and evaluate instructions (CONFIG).
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
EVALUATE_FIRST = "evaluate-first"  # 1: evaluate the received model before training (strategy.evaluate_with_train)
BASE_FINGERPRINT = "base-fingerprint"  # the frozen base every party must hold (common/tasks/exchange.py); query too

# Replies (METRICS, INFO).
MERCHANT_INDEX = "merchant-index"
MERCHANT_NAME = "merchant-name"
ROUNDS_TRAINED = "rounds-trained"  # training rounds this merchant has done in the run, this one included
EVAL_PREFIX = "eval-"  # validation metrics of the received model, carried by a train reply
RECORD_EPSILON = "record-epsilon"  # privacy=example: the epsilon this merchant has spent on its own records
DECLINED = "declined"  # 1: the merchant did not train this round; INFO[REASON] says why
REASON = "reason"

# SecAgg+ (legacy FitIns / FitRes, whose parameters are an unnamed list and whose config holds no lists).
ARRAY_NAMES = "fedshop-array-names"  # the exchanged arrays' names, one per line, in the FitIns config
SECAGG_CLIPPED = "secagg-clipped-values"  # update coordinates beyond secagg.clipping_range, in the FitRes metrics

# A merchant's node config (set by python -m client, or by Flower's simulation engine).
NODE_SHARD = "shard"
NODE_MERCHANT_INDEX = "merchant-index"
NODE_MERCHANT_NAME = "merchant-name"
NODE_PARTITION_ID = "partition-id"
NODE_MODEL_PATH = "model-path"  # the merchant's own copy of the base (deploy.model_path)
NODE_LOG = "log-file"  # where the merchant's tasks append one line per message (python -m client shows them)

# The start of a merchant's refusal to train on another frozen base than the server's (client/client_app.py).
BASE_MISMATCH = "base model fingerprint"

Scalars = dict[str, float]
Spec = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape, dtype)


class WireError(ValueError):
    """A message that does not follow the protocol (the text says which key is wrong)."""


def to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> Flower ArrayRecord (key order kept)."""
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy arrays (copies)."""
    return {k: v.numpy() for k, v in record.items()}


# Transport packing (pack / unpack): each ArrayRecord of several arrays crosses Flower's hops as one array per
# dtype, with its layout in a ConfigRecord beside it. Flower 1.39 sends every Array (and each of its chunks) as a
# separate object, one Runtime API call apiece on each of its three hops (ServerApp -> SuperLink -> SuperNode ->
# ClientApp, and back): a LoRA round of the tiny model was 30 object pulls per task at ~20 ms each on two busy
# cores, 0.8 s of the round. Packed, a record is 4 objects whatever the number of tensors. Packing happens at the
# transport edge only (server/grid.py, client/client_app.py's transport mod): strategies, validation, the audit
# and SecAgg+ see the named arrays.
PACKED_PREFIX = "fedshop-packed:"  # + dtype: the packed arrays of that dtype
LAYOUT = "fedshop-layout"  # ConfigRecord: record key -> JSON [[name, shape, dtype], ...] in packing order


def pack(content: RecordDict) -> RecordDict:
    """The content with every ArrayRecord of several arrays packed into one array per dtype (a new RecordDict;
    the same content when there is nothing to pack)."""
    records: dict[str, Any] = dict(content.items())
    layouts: dict[str, Any] = {}
    for key, record in content.array_records.items():
        if len(record) < 2:
            continue
        arrays = {k: a.numpy() for k, a in record.items()}
        layouts[key] = _json_dumps([[k, list(v.shape), str(v.dtype)] for k, v in arrays.items()])
        dtypes = dict.fromkeys(str(v.dtype) for v in arrays.values())
        records[key] = ArrayRecord({PACKED_PREFIX + d: Array(np.concatenate(
            [v.reshape(-1) for v in arrays.values() if str(v.dtype) == d])) for d in dtypes})
    if not layouts:
        return content
    records[LAYOUT] = ConfigRecord(layouts)
    return RecordDict(records)


def unpack(content: RecordDict) -> RecordDict:
    """Inverse of pack (content that was not packed comes back as it is); WireError names what does not fit."""
    layouts = content.config_records.get(LAYOUT)
    if layouts is None:
        return content
    records: dict[str, Any] = {k: v for k, v in content.items() if k != LAYOUT}
    for key, layout in layouts.items():
        record = content.array_records.get(key)
        if record is None or not isinstance(layout, str):
            raise WireError(f"'{LAYOUT}' names record '{key}', which is not an ArrayRecord of this message")
        records[key] = ArrayRecord(_unpacked(key, record, layout))
    return RecordDict(records)


def _unpacked(key: str, record: ArrayRecord, layout: str) -> dict[str, Array]:
    """The named arrays of one packed record, in layout order."""
    try:
        entries = [(str(n), tuple(int(d) for d in shape), str(dt)) for n, shape, dt in json.loads(layout)]
    except (ValueError, TypeError) as err:
        raise WireError(f"'{LAYOUT}' of record '{key}' is not a list of [name, shape, dtype]: {err}") from None
    flat = {k.removeprefix(PACKED_PREFIX): a.numpy() for k, a in record.items()}
    offsets = dict.fromkeys(flat, 0)
    out = {}
    for name, shape, dtype in entries:
        size, start = math.prod(shape), offsets.get(dtype)
        if start is None or start + size > flat[dtype].size or flat[dtype].ndim != 1:
            raise WireError(f"record '{key}': packed {dtype} data does not hold '{name}' of shape {shape}")
        out[name] = Array(flat[dtype][start:start + size].reshape(shape))
        offsets[dtype] = start + size
    left = {d: flat[d].size - n for d, n in offsets.items() if flat[d].size != n}
    if left or set(record) != {PACKED_PREFIX + d for d in flat}:
        raise WireError(f"record '{key}': packed arrays {sorted(record)} do not match its layout ({left} left over)")
    return out


def _json_dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def spec(arrays: dict[str, np.ndarray]) -> Spec:
    """Names, shapes and dtypes of arrays (the exchanged state's): what the server checks every reply against."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


def _only(records: dict[str, Any], key: str, kind: str) -> Any:
    if set(records) != {key}:
        raise WireError(f"expected one {kind} '{key}', found {sorted(records) or 'none'}")
    return records[key]


def _count(metrics: MetricRecord | dict[str, Any], key: str, positive: bool = False) -> int:
    value = metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(float(value)) \
            or value < (1 if positive else 0) or float(value) != int(value):
        raise WireError(f"missing or invalid {key}={value!r}")
    return int(value)


def _scalars(metrics: MetricRecord | dict[str, Any]) -> Scalars:
    out: Scalars = {}
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise WireError(f"metric {key}={value!r}: expected a number")
        out[key] = value
    return out


@dataclass(frozen=True)
class Instruction:
    """A train or evaluate instruction as a merchant reads it."""

    arrays: ArrayRecord
    server_round: int
    base_fingerprint: str | None = None
    evaluate_first: bool = False
    proximal_mu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # config keys of other components (e.g. DP mods)

    @classmethod
    def from_content(cls, content: RecordDict) -> Instruction:
        """Parse a train (or evaluate) message's content."""
        arrays = _only(dict(content.array_records), ARRAYS, "ArrayRecord")
        config = dict(_only(dict(content.config_records), CONFIG, "ConfigRecord"))
        rnd = config.pop(SERVER_ROUND, None)
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            raise WireError(f"missing or invalid {SERVER_ROUND}={rnd!r}")
        first, mu = config.pop(EVALUATE_FIRST, 0), config.pop(PROXIMAL_MU, 0.0)
        base = config.pop(BASE_FINGERPRINT, None)
        if not isinstance(first, int) or not isinstance(mu, int | float) or not isinstance(base, str | None):
            raise WireError(f"invalid {EVALUATE_FIRST}={first!r}, {PROXIMAL_MU}={mu!r} or {BASE_FINGERPRINT}={base!r}")
        return cls(arrays, rnd, base, bool(first), float(mu), config)

    def to_content(self) -> RecordDict:
        """The message content (SecAgg+ rebuilds it on the merchant from a legacy FitIns)."""
        config: dict[str, Any] = {**self.extra, SERVER_ROUND: self.server_round}
        if self.base_fingerprint is not None:
            config[BASE_FINGERPRINT] = self.base_fingerprint
        if self.evaluate_first:
            config[EVALUATE_FIRST] = 1
        if self.proximal_mu:
            config[PROXIMAL_MU] = self.proximal_mu
        return RecordDict({ARRAYS: self.arrays, CONFIG: ConfigRecord(config)})


def train_config(evaluate_first: bool, base_fingerprint: str) -> ConfigRecord:
    """The config the round loop hands the strategy's configure_train (Flower adds SERVER_ROUND, FedProx mu)."""
    return ConfigRecord({BASE_FINGERPRINT: base_fingerprint, **({EVALUATE_FIRST: 1} if evaluate_first else {})})


def evaluate_config(base_fingerprint: str) -> ConfigRecord:
    """The config the round loop hands the strategy's configure_evaluate."""
    return ConfigRecord({BASE_FINGERPRINT: base_fingerprint})


def query_content(base_fingerprint: str) -> RecordDict:
    """A query: who are you, and do you hold this frozen base?"""
    return RecordDict({CONFIG: ConfigRecord({BASE_FINGERPRINT: base_fingerprint})})


def requested_fingerprint(content: RecordDict) -> str | None:
    """The base fingerprint a server message carries (None when it carries none)."""
    config = content.config_records.get(CONFIG)
    value = config.get(BASE_FINGERPRINT) if config is not None else None
    return value if isinstance(value, str) else None


def cast(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """The arrays in `dtype` (float32 | float16 on the wire); the same record when they already are."""
    if all(a.dtype == dtype for a in record.values()):
        return record
    return ArrayRecord({k: Array(a.numpy().astype(dtype)) for k, a in record.items()})


@dataclass(frozen=True)
class TrainReply:
    """What a merchant sends back after training."""

    arrays: ArrayRecord
    num_examples: int
    merchant_index: int
    rounds_trained: int
    metrics: Scalars  # training metrics (TRAIN_LOSS, TRAIN_SECONDS, SECAGG_CLIPPED, ...), averaged by the server
    evaluation: Scalars = field(default_factory=dict)  # validation metrics of the received model (+ NUM_EXAMPLES)
    record_epsilon: float | None = None  # privacy=example: spent on this merchant's records, this round included

    def to_content(self) -> RecordDict:
        """The reply's content."""
        return RecordDict({ARRAYS: self.arrays, METRICS: MetricRecord(self._metric_record())})

    def _metric_record(self) -> dict[str, Any]:
        spent = {} if self.record_epsilon is None else {RECORD_EPSILON: self.record_epsilon}
        return {**self.metrics, **{EVAL_PREFIX + k: v for k, v in self.evaluation.items()},
                NUM_EXAMPLES: self.num_examples, MERCHANT_INDEX: self.merchant_index,
                ROUNDS_TRAINED: self.rounds_trained, **spent}

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        """Parse a train reply; WireError names what is missing or malformed."""
        arrays = _only(dict(content.array_records), ARRAYS, "ArrayRecord")
        return cls.from_metrics(arrays, dict(_only(dict(content.metric_records), METRICS, "MetricRecord")))

    @classmethod
    def from_metrics(cls, arrays: ArrayRecord, record: dict[str, Any]) -> TrainReply:
        """A train reply from its arrays and its metrics (SecAgg+ carries them in a legacy FitRes)."""
        scalars = _scalars(record)
        n, index = _count(scalars, NUM_EXAMPLES, positive=True), _count(scalars, MERCHANT_INDEX)
        rounds = _count(scalars, ROUNDS_TRAINED, positive=True)
        spent = scalars.get(RECORD_EPSILON)
        if spent is not None and not spent >= 0:
            raise WireError(f"invalid {RECORD_EPSILON}={spent!r}")
        info = {NUM_EXAMPLES, MERCHANT_INDEX, ROUNDS_TRAINED, RECORD_EPSILON}
        evaluation = {k[len(EVAL_PREFIX):]: v for k, v in scalars.items() if k.startswith(EVAL_PREFIX)}
        metrics = {k: v for k, v in scalars.items() if k not in info and not k.startswith(EVAL_PREFIX)}
        return cls(arrays, n, index, rounds, metrics, evaluation, None if spent is None else float(spent))

    def without_secagg_count(self) -> tuple[TrainReply, int]:
        """This reply without its SECAGG_CLIPPED count, and the count (0 when absent)."""
        metrics = dict(self.metrics)
        clipped = int(metrics.pop(SECAGG_CLIPPED, 0))
        return replace(self, metrics=metrics), clipped

    def aggregation_view(self, weight: float) -> RecordDict:
        """What Flower's strategies aggregate: the arrays and the training metrics, weighted by `weight`.

        Bookkeeping (merchant index, rounds, the carried evaluation) stays out: Flower averages every metric it
        finds and refuses replies whose metric keys differ.
        """
        return RecordDict({ARRAYS: self.arrays, METRICS: MetricRecord({**self.metrics, NUM_EXAMPLES: weight})})


@dataclass(frozen=True)
class Declined:
    """A merchant's answer to a train instruction it will not carry out (no update): why, and what it has spent."""

    merchant_index: int
    reason: str
    record_epsilon: float

    def to_content(self) -> RecordDict:
        """The reply's content."""
        return RecordDict({METRICS: MetricRecord({MERCHANT_INDEX: self.merchant_index, DECLINED: 1,
                                                  RECORD_EPSILON: self.record_epsilon}),
                           INFO: ConfigRecord({REASON: self.reason})})

    @classmethod
    def from_content(cls, content: RecordDict) -> Declined | None:
        """The decline a train reply carries; None when it is not one."""
        metrics = content.metric_records.get(METRICS)
        if metrics is None or metrics.get(DECLINED) != 1 or content.array_records:
            return None
        info = _only(dict(content.config_records), INFO, "ConfigRecord")
        spent = metrics.get(RECORD_EPSILON)
        if not isinstance(spent, int | float) or not spent >= 0:
            raise WireError(f"missing or invalid {RECORD_EPSILON}={spent!r}")
        return cls(_count(metrics, MERCHANT_INDEX), str(info.get(REASON, "")), float(spent))


@dataclass(frozen=True)
class EvaluateReply:
    """A merchant's validation metrics of the model it received."""

    num_examples: int
    merchant_index: int
    metrics: Scalars

    def to_content(self) -> RecordDict:
        """The reply's content."""
        return RecordDict({METRICS: MetricRecord({**self.metrics, NUM_EXAMPLES: self.num_examples,
                                                  MERCHANT_INDEX: self.merchant_index})})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateReply:
        """Parse an evaluate reply."""
        scalars = _scalars(_only(dict(content.metric_records), METRICS, "MetricRecord"))
        metrics = {k: v for k, v in scalars.items() if k not in {NUM_EXAMPLES, MERCHANT_INDEX}}
        return cls(_count(scalars, NUM_EXAMPLES), _count(scalars, MERCHANT_INDEX), metrics)

    def aggregation_view(self) -> RecordDict:
        """What Flower's strategies average: the metrics weighted by the validation examples."""
        return RecordDict({METRICS: MetricRecord({**self.metrics, NUM_EXAMPLES: self.num_examples})})

    def as_record(self) -> dict[str, Any]:
        """The metrics with the example count and merchant index (results.json's `evaluated` entries)."""
        return {**self.metrics, NUM_EXAMPLES: self.num_examples, MERCHANT_INDEX: self.merchant_index}


def carried_evaluation(reply: TrainReply) -> EvaluateReply | None:
    """The validation metrics a train reply carried, as an evaluate reply (None when it carried none)."""
    if not reply.evaluation:
        return None
    scores = dict(reply.evaluation)
    n = _count(scores, NUM_EXAMPLES)
    scores.pop(NUM_EXAMPLES)
    return EvaluateReply(n, reply.merchant_index, scores)


@dataclass(frozen=True)
class QueryReply:
    """Who a node is: its merchant index and name, and how many training examples it holds."""

    merchant_index: int
    merchant_name: str
    num_examples: int

    def to_content(self) -> RecordDict:
        """The reply's content."""
        return RecordDict({METRICS: MetricRecord({MERCHANT_INDEX: self.merchant_index,
                                                  NUM_EXAMPLES: self.num_examples}),
                           INFO: ConfigRecord({MERCHANT_NAME: self.merchant_name})})

    @classmethod
    def from_content(cls, content: RecordDict) -> QueryReply:
        """Parse a query reply."""
        scalars = _scalars(_only(dict(content.metric_records), METRICS, "MetricRecord"))
        info = _only(dict(content.config_records), INFO, "ConfigRecord")
        name = info.get(MERCHANT_NAME)
        if not isinstance(name, str) or not name:
            raise WireError(f"missing or invalid {MERCHANT_NAME}={name!r}")
        return cls(_count(scalars, MERCHANT_INDEX), name, _count(scalars, NUM_EXAMPLES))


def aggregation_weight(private: bool, num_examples: int) -> int:
    """What a merchant's update weighs in the mean: its example count, or 1 under a DP preset.

    A DP preset bounds one merchant's influence on the mean by C/m, which needs an unweighted mean of m
    clipped updates; the server's aggregation and the merchant's SecAgg+ weight both follow this rule.
    """
    return 1 if private else num_examples
