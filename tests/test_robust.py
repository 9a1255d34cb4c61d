"""Robust aggregation: one attacker among five merchants moves FedAvg, not FedMedian / FedTrimmedAvg / Krum."""

from __future__ import annotations

import numpy as np
import pytest

from common.protocol import wire
from common.protocol.attacks import poison
from common.run.config import compose
from common.tasks import exchange
from server.report import TrainResult
from server.strategy import Aggregator, build_strategy
from tests.conftest import TINY_REVIEWS
from tests.test_strategy import aggregator, reply, sent

ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum"]


def recording(name: str, reference: dict[str, np.ndarray], **extra: str) -> tuple[Aggregator, dict]:
    cfg = compose(["task=relevance", f"strategy={name}", *[f"strategy.{k}={v}" for k, v in extra.items()]]).strategy
    return aggregator(build_strategy(cfg), wire.spec(reference), private=False,
                      max_update_norm=cfg.max_update_norm), reference


def aggregate_result(chain: tuple[Aggregator, dict], updates: list[dict[str, np.ndarray]],
                     sizes: list[int]) -> TrainResult:
    strategy, reference = chain
    replies = [reply(i + 1, u, {wire.NUM_EXAMPLES: n}) for i, (u, n) in enumerate(zip(updates, sizes, strict=True))]
    return strategy.aggregate_train(sent(list(range(1, len(updates) + 1)), reference), replies)


def aggregate(chain: tuple[Aggregator, dict], updates: list[dict[str, np.ndarray]],
              sizes: list[int]) -> dict[str, np.ndarray]:
    result = aggregate_result(chain, updates, sizes)
    assert result.arrays is not None
    return wire.from_arrays(result.arrays)


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
    result = aggregate_result(strategy, [ok, big], [10, 10])
    assert result.arrays is not None
    np.testing.assert_allclose(result.arrays["w"].numpy(), ok["w"])
    assert "exceeds strategy.max_update_norm=1" in result.report.dropped[0].reason
    assert result.report.replied[0].update_norm == pytest.approx(0.3, rel=1e-5)


@pytest.fixture(scope="module")
def round_updates():
    """One federated round of the tiny model on 5 merchants' review shards, trained for real."""
    from common.tasks import data as D
    from common.tasks import model as M
    from common.tasks import train as T

    # cross-entropy: the attack's loss bound below was measured with it (the class-balanced default shifts it)
    cfg = compose(["task=relevance",
                   *TINY_REVIEWS, "simulation.num_merchants=5", "train.num_threads=1", "train.loss=ce"])
    fd = D.prepare(cfg)
    tokenizer = M.load_tokenizer(cfg.model)
    model = M.build_model(cfg.model, fd.labels, cfg.seed, cfg.finetune)
    start = exchange.extract(model)
    updates, sizes = [], []
    for i, shard in enumerate(fd.train):
        exchange.load(model, start)
        T.train(model, M.tokenize(shard, tokenizer, cfg.train.max_length), tokenizer, cfg.train,
                cfg.train.local_epochs, seed=i)
        updates.append(exchange.extract(model))
        sizes.append(len(shard))
    test = M.tokenize(D.load_test(cfg)[0], tokenizer, cfg.train.max_length)

    def evaluate(weights: dict[str, np.ndarray]) -> dict[str, float]:
        exchange.load(model, weights)
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


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", *ROBUST])
def test_every_strategy_aggregates_only_the_lora_state(name):
    """With LoRA the replies carry only adapters and head; every strategy aggregates exactly those, and a reply
    that also carries a frozen base weight is rejected."""
    from common.tasks import model as M

    cfg = compose(["task=relevance", "model=tiny", "finetune=lora"])
    lora = exchange.extract(M.build_model(cfg.model, ["a", "b", "c"], 0, cfg.finetune))
    rng = np.random.default_rng(1)
    updates = [{k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in lora.items()}
               for _ in range(5)]
    chain = recording(name, lora)
    chain[0].strategy.current_arrays = {k: v.copy() for k, v in lora.items()}  # type: ignore[attr-defined]
    extra = {**updates[0], "base_model.model.bert.pooler.original_module.dense.bias": np.zeros(128, np.float32)}
    result = aggregate_result(chain, [*updates, extra], [10, 20, 30, 40, 50, 60])
    assert result.arrays is not None and set(result.arrays) == set(lora)
    assert [d.node for d in result.report.dropped] == [6] and "not exchanged" in result.report.dropped[0].reason
