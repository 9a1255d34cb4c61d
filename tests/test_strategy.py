"""Server aggregation: weighted FedAvg equals Σ n_k/N θ_k; malformed replies are rejected, not aggregated, and no
reply is changed on the way through; every strategy preset is built from conf/ alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.protocol import wire
from common.run.config import STRATEGIES, compose
from server.strategy import Aggregator, Sent, build_strategy, carried_metrics

ROOT = Path(__file__).resolve().parent.parent


def reply(node: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Message:
    """A train reply from `node` with these arrays and raw metrics (rounds-trained and merchant-index filled in)."""
    ask = Message(content=RecordDict(), dst_node_id=node, message_type=wire.TRAIN)
    full = {wire.ROUNDS_TRAINED: 1, wire.MERCHANT_INDEX: node - 1, **metrics}
    content = RecordDict({wire.ARRAYS: wire.to_arrays(arrays), wire.METRICS: MetricRecord(full)})
    msg = Message(content=content, reply_to=ask)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def sent(nodes: list[int], arrays: dict[str, np.ndarray], server_round: int = 1) -> Sent:
    """What configure_train would have sent these nodes."""
    record = wire.to_arrays(arrays)
    messages = [Message(RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}),
                        dst_node_id=n, message_type=wire.TRAIN) for n in nodes]
    return Sent(server_round, messages, record)


def aggregator(strategy: Any, spec: wire.Spec, private: bool = False, min_replies: int = 1,
               max_update_norm: float | None = None, wire_dtype: str = "float32") -> Aggregator:
    """An Aggregator with the yaml's defaults spelled out (tests build it without a whole config)."""
    return Aggregator(strategy, spec, private=private, min_replies=min_replies, max_update_norm=max_update_norm,
                      wire_dtype=wire_dtype)


def make_aggregator(name: str = "fedavg", reference: dict[str, np.ndarray] | None = None,
                    **kwargs: Any) -> tuple[Aggregator, dict[str, np.ndarray]]:
    reference = reference or {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    strategy = build_strategy(compose(["task=relevance", f"strategy={name}"]).strategy)
    return aggregator(strategy, wire.spec(reference), **kwargs), reference


THETA = [
    ({"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([1, 1, 1], np.float32)}, 10),
    ({"w": np.array([[0, 0], [0, 8]], np.float32), "b": np.array([-2, 0, 4], np.float32)}, 30),
    ({"w": np.array([[5, 5], [5, 5]], np.float32), "b": np.array([0, 3, 0], np.float32)}, 60),
]


def test_weighted_average_matches_formula_and_replies_are_not_changed():
    aggregator, ref = make_aggregator()
    replies = [reply(i + 1, theta, {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: float(i), "eval-loss": 0.5,
                                    "eval-num-examples": 3}) for i, (theta, n) in enumerate(THETA)]
    before = [copy.deepcopy(r.content) for r in replies]
    result = aggregator.aggregate_train(sent([1, 2, 3], ref), replies)
    assert result.arrays is not None and result.metrics is not None
    total = sum(n for _, n in THETA)
    for key in ("w", "b"):
        expected = sum(theta[key] * (n / total) for theta, n in THETA)
        np.testing.assert_allclose(result.arrays[key].numpy(), expected, rtol=1e-6)
    assert result.metrics[wire.TRAIN_LOSS] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert set(result.metrics) == {wire.TRAIN_LOSS}  # bookkeeping and carried evaluation stay out
    assert [r.num_examples for r in result.report.replied] == [10, 30, 60]
    assert [r.merchant_index for r in result.report.replied] == [0, 1, 2]
    assert result.report.dropped == [] and not result.report.too_few_replies
    for msg, content in zip(replies, before, strict=True):  # nothing was rewritten or deleted
        assert dict(msg.content.metric_records[wire.METRICS]) == dict(content.metric_records[wire.METRICS])
        assert list(msg.content.array_records[wire.ARRAYS]) == list(content.array_records[wire.ARRAYS])


@pytest.mark.parametrize("bad,reason", [
    ({"w": np.array([[np.nan, 0], [0, 0]], np.float32), "b": np.zeros(3, np.float32)}, "NaN or Inf"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "shape"),
    ({"w": np.zeros((2, 2), np.float64), "b": np.zeros(3, np.float32)}, "dtype"),
    ({"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32), "frozen.base": np.zeros(1, np.float32)},
     "not exchanged: ['frozen.base']"),
])
def test_malformed_update_is_rejected(bad, reason):
    aggregator, ref = make_aggregator()
    replies = [reply(1, THETA[0][0], {wire.NUM_EXAMPLES: 10}), reply(2, bad, {wire.NUM_EXAMPLES: 1000})]
    result = aggregator.aggregate_train(sent([1, 2], ref), replies)
    assert result.arrays is not None
    np.testing.assert_array_equal(result.arrays["w"].numpy(), THETA[0][0]["w"])
    assert result.report.dropped[0].node == 2
    assert reason in result.report.dropped[0].reason


def test_missing_num_examples_and_a_silent_merchant_are_recorded():
    aggregator, ref = make_aggregator()
    replies = [reply(1, THETA[0][0], {wire.NUM_EXAMPLES: 10}), reply(2, THETA[1][0], {wire.TRAIN_LOSS: 0.1})]
    result = aggregator.aggregate_train(sent([1, 2, 3], ref), replies)
    assert result.arrays is not None
    np.testing.assert_array_equal(result.arrays["b"].numpy(), THETA[0][0]["b"])
    reasons = {d.node: d.reason for d in result.report.dropped}
    assert wire.NUM_EXAMPLES in reasons[2] and reasons[3] == "no reply before the round timeout"


def test_too_few_valid_replies_aggregate_nothing():
    aggregator, ref = make_aggregator(min_replies=2)
    result = aggregator.aggregate_train(sent([1, 2], ref), [reply(1, THETA[0][0], {wire.NUM_EXAMPLES: 10})])
    assert result.arrays is None and result.report.too_few_replies and len(result.report.replied) == 1


def _yaml_values(name: str) -> dict[str, Any]:
    """conf/strategy/<name>.yaml with its defaults chain, read as plain YAML (not through Hydra)."""
    doc = yaml.safe_load((ROOT / "conf" / "strategy" / f"{name}.yaml").read_text())
    out: dict[str, Any] = {}
    for parent in doc.pop("defaults", []):
        if parent != "_self_":
            out.update(_yaml_values(parent))
    return {**out, **doc}


FLOWER_ATTRIBUTES = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                     "min_available_nodes", "proximal_mu", "eta", "eta_l", "beta_1", "beta_2", "tau", "beta",
                     "num_malicious_nodes", "num_nodes_to_select", "server_learning_rate", "server_momentum")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_preset_is_flowers_with_the_yaml_values(name):
    """conf/ is the only source of defaults: each built Flower strategy carries exactly the yaml's values."""
    from flwr.serverapp import strategy as flower

    values = _yaml_values(name)
    built = build_strategy(compose(["task=relevance", f"strategy={name}"]).strategy)
    classes = {"fedavg": flower.FedAvg, "fedprox": flower.FedProx, "fedadam": flower.FedAdam,
               "fedyogi": flower.FedYogi, "fedadagrad": flower.FedAdagrad, "fedavgm": flower.FedAvgM,
               "fedmedian": flower.FedMedian, "fedtrimmedavg": flower.FedTrimmedAvg, "krum": flower.Krum,
               "multikrum": flower.MultiKrum}
    assert type(built) is classes[name]
    checked = [a for a in FLOWER_ATTRIBUTES if values.get(a) is not None]
    assert {"fraction_train", "min_train_nodes"} <= set(checked)
    for attribute in checked:
        assert getattr(built, attribute) == pytest.approx(values[attribute]), attribute
    assert built.weighted_by_key == wire.NUM_EXAMPLES


def test_a_strategy_without_its_yaml_value_is_refused():
    from common.run.errors import FedshopError

    with pytest.raises(FedshopError, match="config strategy.eta=None"):
        compose(["task=relevance", "strategy=fedadam", "strategy.eta=null"])


def test_evaluation_carried_by_train_replies_is_split_off_and_weighted_by_validation_size():
    aggregator, ref = make_aggregator()
    evals = [(0.9, 0.5, 4), (0.3, 1.0, 12), (0.6, 0.25, 0)]  # (loss, accuracy, validation examples)
    replies = [reply(i + 1, theta, {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: 1.0, "eval-loss": loss,
                                    "eval-accuracy": acc, "eval-num-examples": nv,
                                    # as T.evaluate: no ranking metric without validation examples
                                    **({"eval-ndcg@10": 0.5 + i / 10} if nv else {})})
               for i, ((theta, n), (loss, acc, nv)) in enumerate(zip(THETA, evals, strict=True))]
    result = aggregator.aggregate_train(sent([1, 2, 3], ref), replies)
    assert result.metrics is not None and not any(k.startswith(wire.EVAL_PREFIX) for k in result.metrics)
    carried = result.report.pre_evaluated
    assert [e.reply.merchant_index for e in carried] == [0, 1, 2]
    assert carried[1].reply.metrics["accuracy"] == 1.0
    pre = carried_metrics(carried)
    assert pre is not None  # the merchant without validation examples carries no weight
    assert pre["loss"] == pytest.approx((0.9 * 4 + 0.3 * 12) / 16)
    assert pre["accuracy"] == pytest.approx((0.5 * 4 + 1.0 * 12) / 16)
    assert pre["ndcg@10"] == pytest.approx((0.5 * 4 + 0.6 * 12) / 16)


def test_train_replies_without_evaluation_leave_none_to_record():
    aggregator, ref = make_aggregator()
    result = aggregator.aggregate_train(sent([1, 2, 3], ref), [reply(i + 1, theta, {wire.NUM_EXAMPLES: n})
                                                                for i, (theta, n) in enumerate(THETA)])
    assert result.report.pre_evaluated == [] and carried_metrics(result.report.pre_evaluated) is None


def test_wire_round_trips_and_names_the_bad_key():
    arrays = wire.to_arrays({"w": np.ones((2, 2), np.float32)})
    sent_reply = wire.TrainReply(arrays, 12, 3, 2, {wire.TRAIN_LOSS: 0.5}, {"loss": 0.4, wire.NUM_EXAMPLES: 5})
    back = wire.TrainReply.from_content(sent_reply.to_content())
    assert (back.num_examples, back.merchant_index, back.rounds_trained) == (12, 3, 2)
    assert back.metrics == {wire.TRAIN_LOSS: 0.5} and back.evaluation == {"loss": 0.4, wire.NUM_EXAMPLES: 5}
    carried = wire.carried_evaluation(back)
    assert carried is not None and carried.num_examples == 5 and carried.metrics == {"loss": 0.4}
    query = wire.QueryReply(4, "shop", 99)
    assert wire.QueryReply.from_content(query.to_content()) == query
    evaluation = wire.EvaluateReply(7, 1, {"accuracy": 0.5})
    assert wire.EvaluateReply.from_content(evaluation.to_content()) == evaluation
    ins = wire.Instruction(arrays, 3, evaluate_first=True, proximal_mu=0.1, extra={"clipping_norm": 1.0})
    parsed = wire.Instruction.from_content(ins.to_content())
    assert (parsed.server_round, parsed.evaluate_first, parsed.proximal_mu, parsed.extra) == (3, True, 0.1,
                                                                                               ins.extra)
    bad = sent_reply.to_content()
    bad.metric_records[wire.METRICS][wire.NUM_EXAMPLES] = -1
    with pytest.raises(wire.WireError, match=f"invalid {wire.NUM_EXAMPLES}=-1"):
        wire.TrainReply.from_content(bad)
    with pytest.raises(wire.WireError, match="expected one ArrayRecord 'arrays'"):
        wire.TrainReply.from_content(RecordDict({"weights": ArrayRecord(), wire.METRICS: MetricRecord()}))


def test_fedadams_aggregate_keeps_the_exchanged_dtype():
    """Flower's FedAdam promotes float32 weights to float64; the global state stays float32, so the next round's
    float32 replies are still accepted (they were all rejected before)."""
    aggregator, ref = make_aggregator("fedadam")
    strategy = aggregator.strategy
    for rnd in (1, 2):
        round_sent = sent([1, 2, 3], ref, server_round=rnd)
        strategy.current_arrays = wire.from_arrays(round_sent.arrays)  # type: ignore[attr-defined]
        result = aggregator.aggregate_train(round_sent, [reply(i + 1, theta, {wire.NUM_EXAMPLES: n})
                                                         for i, (theta, n) in enumerate(THETA)])
        assert result.arrays is not None and len(result.report.replied) == 3
        assert {a.dtype for a in result.arrays.values()} == {"float32"}
        ref = wire.from_arrays(result.arrays)
