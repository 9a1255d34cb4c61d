"""Server aggregation: weighted FedAvg equals Σ n_k/N θ_k; malformed replies are rejected, not aggregated."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common.config import compose
from server.strategy import RecordingStrategy, build_strategy


def reply(node: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Message:
    ask = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    msg = Message(content=content, reply_to=ask)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def make_strategy(name: str = "fedavg") -> RecordingStrategy:
    strategy = RecordingStrategy(build_strategy(compose([f"strategy={name}"]).strategy))
    strategy.new_round()
    strategy._expected = {"w": ((2, 2), "float32"), "b": ((3,), "float32")}
    strategy._global = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(3, np.float32))})
    return strategy


THETA = [
    ({"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([1, 1, 1], np.float32)}, 10),
    ({"w": np.array([[0, 0], [0, 8]], np.float32), "b": np.array([-2, 0, 4], np.float32)}, 30),
    ({"w": np.array([[5, 5], [5, 5]], np.float32), "b": np.array([0, 3, 0], np.float32)}, 60),
]


def test_weighted_average_matches_formula():
    strategy = make_strategy()
    replies = [reply(i + 1, theta, {"num-examples": n, "train-loss": float(i)}) for i, (theta, n) in enumerate(THETA)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    total = sum(n for _, n in THETA)
    for key in ("w", "b"):
        expected = sum(theta[key] * (n / total) for theta, n in THETA)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert [r["num_examples"] for r in strategy.record["replied"]] == [10, 30, 60]


@pytest.mark.parametrize("bad,reason", [
    ({"w": np.array([[np.nan, 0], [0, 0]], np.float32), "b": np.zeros(3, np.float32)}, "NaN or Inf"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "shape"),
    ({"w": np.zeros((2, 2), np.float64), "b": np.zeros(3, np.float32)}, "dtype"),
])
def test_malformed_update_is_rejected(bad, reason):
    strategy = make_strategy()
    replies = [reply(1, THETA[0][0], {"num-examples": 10}), reply(2, bad, {"num-examples": 1000})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_array_equal(arrays["w"].numpy(), THETA[0][0]["w"])
    assert strategy.record["dropped"][0]["node"] == 2
    assert reason in strategy.record["dropped"][0]["reason"]


def test_missing_num_examples_is_rejected():
    strategy = make_strategy()
    replies = [reply(1, THETA[0][0], {"num-examples": 10}), reply(2, THETA[1][0], {"train-loss": 0.1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_array_equal(arrays["b"].numpy(), THETA[0][0]["b"])
    assert "num-examples" in strategy.record["dropped"][0]["reason"]


def test_strategy_presets_are_flowers():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    assert type(build_strategy(compose([]).strategy)) is FedAvg
    prox = build_strategy(compose(["strategy=fedprox"]).strategy)
    assert isinstance(prox, FedProx) and prox.proximal_mu == pytest.approx(0.01)
    adam = build_strategy(compose(["strategy=fedadam"]).strategy)
    assert isinstance(adam, FedAdam) and adam.eta == pytest.approx(1e-3)


def test_evaluation_carried_by_train_replies_is_split_off_and_weighted_by_validation_size():
    strategy = make_strategy()
    evals = [(0.9, 0.5, 4), (0.3, 1.0, 12), (0.6, 0.25, 0)]  # (loss, accuracy, validation examples)
    replies = [reply(i + 1, theta, {"num-examples": n, "train-loss": 1.0, "eval-loss": loss, "eval-accuracy": acc,
                                    "eval-num-examples": nv, "merchant-index": i,
                                    # as T.evaluate: no ranking metric without validation examples
                                    **({"eval-ndcg@10": 0.5 + i / 10} if nv else {})})
               for i, ((theta, n), (loss, acc, nv)) in enumerate(zip(THETA, evals, strict=True))]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and not any(k.startswith("eval-") for k in metrics)
    assert [e["merchant-index"] for e in strategy.record["pre_evaluated"]] == [0, 1, 2]
    assert strategy.record["pre_evaluated"][1]["accuracy"] == 1.0
    pre = strategy.pre_evaluation()
    assert pre is not None  # the merchant without validation examples carries no weight
    assert pre["loss"] == pytest.approx((0.9 * 4 + 0.3 * 12) / 16)
    assert pre["accuracy"] == pytest.approx((0.5 * 4 + 1.0 * 12) / 16)
    assert pre["ndcg@10"] == pytest.approx((0.5 * 4 + 0.6 * 12) / 16)


def test_train_replies_without_evaluation_leave_none_to_record():
    strategy = make_strategy()
    strategy.aggregate_train(1, [reply(i + 1, theta, {"num-examples": n}) for i, (theta, n) in enumerate(THETA)])
    assert strategy.record["pre_evaluated"] == [] and strategy.pre_evaluation() is None
