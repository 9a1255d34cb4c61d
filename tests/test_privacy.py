"""Differential privacy: the clipping bound, the noise scale, accounting against published figures, the
epsilon budget stop, and DP rounds that lose a merchant."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.protocol import wire
from common.run.config import compose
from server import flower_patches
from server.privacy import Ledger, make_private
from server.strategy import build_strategy
from tests.conftest import TINY_REVIEWS, run_cli
from tests.test_strategy import aggregator, reply, sent

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       data=st.data(), clip=st.floats(1e-3, 1e2))
def test_every_clipped_update_has_norm_at_most_c(shapes, data, clip):
    """Flower's compute_clip_model_update (fixedclipping_mod, LocalDpMod and the central wrapper use it), with
    fedshop's zero-safe clipping installed: Flower's own divides by zero on a zero update (the first example
    hypothesis found)."""
    flower_patches.apply()
    reference = [data.draw(arrays(np.float32, s, elements=FLOATS)) for s in shapes]
    local = [data.draw(arrays(np.float32, s, elements=FLOATS)) for s in shapes]
    before = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(local, reference,
                                                                                          strict=True)))
    clipped = [a.copy() for a in local]
    compute_clip_model_update(clipped, reference, clip)
    after = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(clipped, reference,
                                                                                         strict=True)))
    # The clipped model reference + update is float32: each weight is rounded by up to 2^-24 of its size.
    size = max(float(np.abs(a).max()) for a in [*reference, *local])
    rounding = 2**-23 * size * math.sqrt(sum(a.size for a in local))
    assert after <= clip * (1 + 1e-4) + rounding
    if before <= clip:  # short updates pass unchanged
        for a, b in zip(clipped, local, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    else:  # long ones are scaled onto the sphere of radius C
        assert after == pytest.approx(clip, rel=1e-3, abs=rounding)


def private_strategy(preset: str, population: int, **overrides):
    cfg = compose(["task=relevance", f"privacy={preset}", f"simulation.num_merchants={population}",
                   *[f"privacy.{k}={v}" for k, v in overrides.items()]])
    inner = build_strategy(cfg.strategy)
    return make_private(inner, cfg.privacy, cfg.strategy, population), cfg


def test_central_noise_std_is_z_c_over_the_replies_aggregated_even_after_a_dropout():
    dp, cfg = private_strategy("central", 5, noise_multiplier=0.8, clipping_norm=0.5)
    np.random.seed(0)
    theta = {"w": np.random.randn(400, 250).astype(np.float32)}
    dp.current_arrays = ArrayRecord({"w": Array(theta["w"])})
    recording = aggregator(dp, wire.spec(theta), private=True)
    # Three of five sampled merchants reply, each with the global model unchanged: the aggregate is pure noise.
    replies = [reply(n, theta, {wire.NUM_EXAMPLES: 10 * n}) for n in (1, 2, 3)]
    result = recording.aggregate_train(sent([1, 2, 3, 4, 5], theta), replies)
    assert result.arrays is not None
    noise = result.arrays["w"].numpy() - theta["w"]
    assert noise.std() == pytest.approx(0.8 * 0.5 / 3, rel=0.02)  # z*C/m with m = 3 replies, not 5 sampled
    assert abs(noise.mean()) < 0.01
    assert [d.node for d in result.report.dropped] == [4, 5]
    assert result.report.privacy == recording.privacy_spent()
    spent = recording.privacy_spent()
    reference = RdpAccountant(PrivacyConfig(1e-5, 5, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                            SamplingMethod.NO_AMPLIFICATION))
    reference.compose(GaussianPrivacyEvent(0.8, 5, 5))
    assert spent is not None and spent["releases"] == 1
    assert spent["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert spent["sampling"].startswith("no amplification")


def test_dp_aggregation_is_unweighted_mean_of_clipped_updates():
    dp, _ = private_strategy("central", 2, noise_multiplier=1e-6, clipping_norm=1.0)
    zero = {"w": np.zeros((2, 2), np.float32)}
    dp.current_arrays = ArrayRecord({"w": Array(zero["w"])})
    big = {"w": np.full((2, 2), 3.0, np.float32)}  # norm 6: clipped to 1 -> every entry 0.5
    small = {"w": np.full((2, 2), 0.1, np.float32)}  # norm 0.2: unchanged
    chain = aggregator(dp, wire.spec(zero), private=True)
    result = chain.aggregate_train(sent([1, 2], zero), [reply(1, big, {wire.NUM_EXAMPLES: 1000}),
                                                             reply(2, small, {wire.NUM_EXAMPLES: 1})])
    assert result.arrays is not None  # the example counts are recorded but do not weigh
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full((2, 2), (0.5 + 0.1) / 2), atol=1e-4)
    assert [r.num_examples for r in result.report.replied] == [1000, 1]


def test_accountant_matches_published_figures():
    """Opacus' compute_dp_sgd_privacy docs: N=60000, batch 256, z=1.12, 60 epochs, orders (10, 20, 100),
    delta=1e-5 -> epsilon 2.95 (RDP converted with eps = rdp + log(1/delta)/(alpha-1)). Abadi et al. 2016:
    q=0.01, z=4, 10000 steps -> epsilon <= 1.26 (moments accountant). The Ledger's accountant (Flower's
    RdpAccountant over dp-accounting) converts more tightly, so it must come out at or below both."""
    steps = math.ceil(60 / (256 / 60000))
    orders = (10.0, 20.0, 100.0)
    acc = RdpAccountant(PrivacyConfig(1e-5, 60000, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON),
                        orders=orders)
    acc.compose(GaussianPrivacyEvent(1.12, 256, 60000), steps)
    rdp = acc._backend._rdp  # the composed RDP curve, per order
    classic = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip(orders, rdp, strict=True))
    assert classic == pytest.approx(2.95, abs=0.01)
    assert acc.get_epsilon(1e-5) <= classic
    abadi = RdpAccountant(PrivacyConfig(1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON))
    abadi.compose(GaussianPrivacyEvent(4.0, 1, 100), 10000)
    assert 0.9 <= abadi.get_epsilon(1e-5) <= 1.26


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle & Wang 2018 (Theorem 8): the exact epsilon of one Gaussian release with noise multiplier z."""
    from statistics import NormalDist

    phi = NormalDist().cdf

    def delta_at(eps: float) -> float:
        return phi(-eps * z + 1 / (2 * z)) - math.exp(eps) * phi(-eps * z - 1 / (2 * z))

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (1.0, 5), (2.0, 10), (0.7, 3)])
def test_ledger_epsilon_bounds_the_exact_gaussian_composition(z, rounds):
    """Without sampling, `rounds` releases with noise multiplier z are exactly one release with z/sqrt(rounds):
    the RDP figure is an upper bound on that exact epsilon, and a close one."""
    cfg = compose(["task=relevance", "privacy=central", f"privacy.noise_multiplier={z}"]).privacy
    ledger = Ledger(cfg, population=10, sample_size=10)
    for _ in range(rounds):
        ledger.compose()
    exact = exact_gaussian_epsilon(z / math.sqrt(rounds), 1e-5)
    assert exact <= ledger.spent()["epsilon"] <= 1.35 * exact


def test_sampling_is_accounted_without_replacement_under_replace_one():
    """Flower samples a fixed number of merchants uniformly: sampling without replacement, whose accounting
    (Wang et al. 2019, in dp-accounting) is for replace-one neighbours, where the clipped sum moves by 2C."""
    import dp_accounting

    cfg = compose(["task=relevance", "privacy=central", "privacy.noise_multiplier=1.0"]).privacy
    three, two = Ledger(cfg, population=10, sample_size=3), Ledger(cfg, population=10, sample_size=2)
    for _ in range(5):
        three.compose()
        two.compose()
    assert three.spent()["sampling"].startswith("3 of 10 merchants without replacement")
    assert three.noise == 0.5
    direct = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 3, dp_accounting.GaussianDpEvent(0.5)), 5)
    assert three.spent()["epsilon"] == pytest.approx(direct.get_epsilon(1e-5))
    assert two.spent()["epsilon"] < three.spent()["epsilon"]  # a smaller sample spends less


def test_local_preset_accounts_each_merchant_release():
    cfg = compose(["task=relevance", "privacy=local", "privacy.local_epsilon=2.0", "privacy.local_delta=1e-5"]).privacy
    ledger = Ledger(cfg, population=4, sample_size=4)
    ledger.compose()
    # One Gaussian release calibrated by the classic bound (LocalDpMod) is at least (2, 1e-5)-DP.
    assert ledger.noise == pytest.approx(math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0)
    assert ledger.spent()["epsilon"] <= 2.0 + 1e-9


def test_budget_stop_fires_before_the_round_that_would_exceed_it(tmp_path):
    z = 2.0
    per_round = []
    cfg = compose(["task=relevance", "privacy=central", f"privacy.noise_multiplier={z}"]).privacy
    ledger = Ledger(cfg, population=3, sample_size=3)
    for _ in range(3):
        ledger.compose()
        per_round.append(ledger.spent()["epsilon"])
    target = (per_round[1] + per_round[2]) / 2  # two rounds fit, the third would not
    proc = run_cli("simulation", [*TINY_REVIEWS, "simulation.num_merchants=3", "strategy.num_rounds=4",
                                  "privacy=central", f"privacy.noise_multiplier={z}", "privacy.clipping_norm=0.05",
                                  f"privacy.target_epsilon={target}", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "stopped_privacy_budget"
    assert results["stopped"]["before_round"] == 3 and results["stopped"]["reason"] == "privacy budget"
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    eps = [r["privacy"]["epsilon"] for r in results["rounds"][1:]]
    assert eps == pytest.approx(per_round[:2]) and eps[-1] <= target
    assert results["privacy"]["epsilon"] == pytest.approx(per_round[1])
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # the model is saved
    assert (tmp_path / "run" / "checkpoints" / "round_2.pt").is_file()
    assert "epsilon" in proc.stderr + proc.stdout


# client in the default suite; the other two (about 55 s each) in the slow one.
@pytest.mark.parametrize("preset", [pytest.param("central_adaptive", marks=pytest.mark.slow), "client",
                                    pytest.param("local", marks=pytest.mark.slow)])
def test_each_preset_runs_end_to_end_in_simulation_and_is_accounted(preset, tmp_path):
    clip = 0.05
    proc = run_cli("simulation", [*TINY_REVIEWS, "simulation.num_merchants=3", "strategy.num_rounds=2",
                                  f"privacy={preset}", f"privacy.clipping_norm={clip}", "privacy.noise_multiplier=0.5",
                                  "privacy.clipped_count_stddev=1.0", "privacy.local_epsilon=50",
                                  f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["privacy"]["preset"] == preset
    rounds = results["rounds"][1:]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] and results["privacy"]["releases"] == 2
    norms = [x["update_norm"] for r in rounds for x in r["replied"]]
    if preset == "client":  # merchants clipped before sending: the server never sees a longer update
        assert max(norms) <= clip * (1 + 1e-4)
    if preset == "local":  # clipped, then noised on the merchant: what leaves is longer than C
        assert min(norms) > clip
    if preset == "central_adaptive":
        assert results["privacy"]["noise_multiplier"] == 0.5


def test_accountant_and_adaptive_clip_resume_from_a_checkpoint(tmp_path):
    """A resumed DP run goes on spending from where it stopped: the accountant's releases, the population it
    was accounted over and the adaptive clipping norm come back from the checkpoint."""
    from common.run import checkpoint as C

    dp, _ = private_strategy("central_adaptive", 4, noise_multiplier=1.3, target_epsilon=20)
    before = aggregator(dp, {}, private=True)
    for _ in range(3):
        dp.ledger.compose()
    dp.clipping_norm = 0.37
    C.save(tmp_path / "round_3.pt", server_round=3, weights={"w": np.zeros(2, np.float32)}, config_json="{}",
           strategy_state=before.state(), history=[], base_fingerprint="f")
    state = C.load(tmp_path / "round_3.pt")["strategy_state"]
    elsewhere, _ = private_strategy("central_adaptive", 9, noise_multiplier=1.3)
    with pytest.raises(ValueError, match="does not match"):  # an accountant for another population refuses it
        aggregator(elsewhere, {}, private=True).load_state(state)
    # server/federation.py builds the resumed strategy for the population the checkpoint was accounted over
    fresh, _ = private_strategy("central_adaptive", state["privacy"]["population"], noise_multiplier=1.3,
                                target_epsilon=20)
    after = aggregator(fresh, {}, private=True)
    after.load_state(state)
    spent, reference = after.privacy_spent(), before.privacy_spent()
    assert spent is not None and spent == reference and spent["releases"] == 3 and fresh.clipping_norm == 0.37
    for _ in range(2):
        dp.ledger.compose()
        fresh.ledger.compose()
    spent, reference = after.privacy_spent(), before.privacy_spent()
    assert spent is not None and reference is not None and spent["epsilon"] == pytest.approx(reference["epsilon"])
    assert after.budget_exhausted() == before.budget_exhausted()
