"""Robust aggregation: one attacker among five merchants moves FedAvg, not FedMedian / FedTrimmedAvg / Krum."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.attacks import poison
from common.config import compose
from server.strategy import RecordingStrategy, build_strategy
from tests.conftest import TINY_REVIEWS
from tests.test_strategy import reply

ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum"]


def recording(name: str, reference: dict[str, np.ndarray], **extra: str) -> RecordingStrategy:
    cfg = compose([f"strategy={name}", *[f"strategy.{k}={v}" for k, v in extra.items()]]).strategy
    strategy = RecordingStrategy(build_strategy(cfg), max_update_norm=cfg.max_update_norm)
    strategy.new_round()
    strategy._expected = {k: (tuple(v.shape), str(v.dtype)) for k, v in reference.items()}
    strategy._global = ArrayRecord({k: Array(v) for k, v in reference.items()})
    return strategy


def aggregate(strategy: RecordingStrategy, updates: list[dict[str, np.ndarray]],
              sizes: list[int]) -> dict[str, np.ndarray]:
    replies = [reply(i + 1, u, {"num-examples": n}) for i, (u, n) in enumerate(zip(updates, sizes, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def test_robust_strategies_ignore_a_sign_flipped_update_that_moves_fedavg():
    rng = np.random.default_rng(0)
    theta = {"w": rng.standard_normal((20, 30)).astype(np.float32)}
    step = {"w": (0.1 * rng.standard_normal((20, 30))).astype(np.float32)}
    honest = [{"w": theta["w"] + step["w"] + 0.01 * rng.standard_normal((20, 30)).astype(np.float32)}
              for _ in range(4)]
    attacker = poison(honest[0], theta, "sign_flip", 10.0)
    target = theta["w"] + step["w"]

    def error(name: str) -> float:
        got = aggregate(recording(name, theta), [attacker, *honest], [100] * 5)["w"]
        return float(np.linalg.norm(got - target) / np.linalg.norm(step["w"]))

    assert error("fedavg") > 1.5  # the attacker drags the mean far past the honest step
    for name in ROBUST:
        assert error(name) < 0.3, name


def test_norm_bound_rejects_an_oversized_update():
    theta = {"w": np.zeros((3, 3), np.float32)}
    strategy = recording("fedavg", theta, max_update_norm="1.0")
    ok, big = {"w": np.full((3, 3), 0.1, np.float32)}, {"w": np.full((3, 3), 5.0, np.float32)}
    got = aggregate(strategy, [ok, big], [10, 10])
    np.testing.assert_allclose(got["w"], ok["w"])
    assert "exceeds strategy.max_update_norm=1" in strategy.record["dropped"][0]["reason"]
    assert strategy.record["replied"][0]["update_norm"] == pytest.approx(0.3, rel=1e-5)


@pytest.fixture(scope="module")
def round_updates():
    """One federated round of the tiny model on 5 merchants' review shards, trained for real."""
    from common import data as D
    from common import model as M
    from common import train as T

    cfg = compose([*TINY_REVIEWS, "simulation.num_merchants=5", "train.num_threads=1"])
    fd = D.prepare(cfg)
    tokenizer = M.load_tokenizer(cfg.model)
    model = M.build_model(cfg.model, fd.labels, cfg.seed)
    start = M.get_weights(model)
    updates, sizes = [], []
    for i, shard in enumerate(fd.train):
        M.set_weights(model, start)
        T.train(model, M.tokenize(shard, tokenizer, cfg.train.max_length), tokenizer, cfg.train,
                cfg.train.local_epochs, seed=i)
        updates.append(M.get_weights(model))
        sizes.append(len(shard))
    test = M.tokenize(D.load_test(cfg)[0], tokenizer, cfg.train.max_length)

    def evaluate(weights: dict[str, np.ndarray]) -> dict[str, float]:
        M.set_weights(model, weights)
        return T.evaluate(model, test, tokenizer, cfg.train, None)

    return start, updates, sizes, evaluate


def test_one_attacker_among_five_degrades_fedavg_not_the_robust_options(round_updates):
    """Measured on the tiny model (loose bounds): merchant 0 sends theta - 10 * its update."""
    start, updates, sizes, evaluate = round_updates
    attacked = [poison(updates[0], start, "sign_flip", 10.0), *updates[1:]]
    initial = evaluate(start)
    clean = evaluate(aggregate(recording("fedavg", start), updates, sizes))
    fedavg = evaluate(aggregate(recording("fedavg", start), attacked, sizes))
    assert clean["loss"] < initial["loss"]  # one honest round learns something
    assert fedavg["loss"] > clean["loss"] + 0.5 and fedavg["accuracy"] < clean["accuracy"]
    for name in ROBUST:
        robust = evaluate(aggregate(recording(name, start), attacked, sizes))
        assert robust["loss"] < clean["loss"] + 0.15, (name, robust, clean)
        assert robust["loss"] < initial["loss"], name
