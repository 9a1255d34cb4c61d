"""Differential privacy on the server: Flower's DP strategy wrappers, made dropout-tolerant and accounted.

Flower 1.39's wrappers calibrate noise to `num_sampled_clients` and, with an accountant, refuse a round
whose reply count differs from it; their accountant also supports only unweighted FedAvg without sampling
amplification. fedshop wraps them so that:
- the noise is calibrated to the replies actually aggregated: the mean of m clipped updates gets
  N(0, (z*C/m)^2), whatever m turned out to be, so a dropped merchant costs utility, not the round;
- aggregation is unweighted (every clipped update counts 1/m), which is what bounds one merchant's
  influence on the mean by C/m;
- the (epsilon, delta) spent is accounted with Flower's RdpAccountant (dp-accounting) under the sampling
  that really happened: all available merchants every round is "no amplification" (add/remove one
  merchant); a random fraction is sampling without replacement (replace one merchant, which moves the
  clipped sum by up to 2C, so the event's noise multiplier is z/2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.run.config import PrivacyConfig, StrategyConfig
from server.flower_patches import AdaptiveNoiseFix

log = logging.getLogger(__name__)


def local_noise_multiplier(epsilon: float, delta: float) -> float:
    """LocalDpMod's noise standard deviation in units of the sensitivity: sqrt(2 ln(1.25/delta)) / epsilon."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _noise(cfg: PrivacyConfig) -> float:
    """The merchant-level presets' noise multiplier (common/run/config/ refuses them a null one)."""
    assert cfg.noise_multiplier is not None
    return cfg.noise_multiplier


class Ledger:
    """The (epsilon, delta) a run has spent, per round, with Flower's RDP accountant."""

    def __init__(self, cfg: PrivacyConfig, population: int, sample_size: int) -> None:
        self.cfg, self.population, self.sample_size = cfg, population, sample_size
        if cfg.name == "local":
            # Each merchant's own release per round; a merchant may take part in every round.
            self.noise, self.sampling = local_noise_multiplier(cfg.local_epsilon, cfg.local_delta), "local"
            method, relation = SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE
        elif sample_size >= population:
            self.noise, self.sampling = _noise(cfg), "no amplification (every merchant, every round)"
            method, relation = SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE
        else:
            self.noise = _noise(cfg) / 2.0
            self.sampling = f"{sample_size} of {population} merchants without replacement, replace-one"
            method, relation = SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE
        self.accountant = RdpAccountant(AccountingConfig(target_delta=cfg.delta, population_size=population,
                                                         neighboring_relation=relation, sampling_method=method))

    def event(self) -> GaussianPrivacyEvent:
        """One round's release: the configured sample (dropouts do not change who was sampled)."""
        return GaussianPrivacyEvent(noise_multiplier=self.noise, sample_size=min(self.sample_size,
                                                                                  self.population),
                                    population_size=self.population)

    def would_exceed(self) -> bool:
        """Whether one more round would spend more than privacy.target_epsilon."""
        target = self.cfg.target_epsilon
        return target is not None and self.accountant.would_exceed(self.event(), max_epsilon=target)

    def compose(self) -> None:
        """Account one released aggregate."""
        self.accountant.compose(self.event())

    def spent(self) -> dict[str, Any]:
        """epsilon spent so far (0.0 before the first release), delta and the accounting model."""
        releases = self.accountant.num_releases
        epsilon = self.accountant.get_epsilon(self.cfg.delta) if releases else 0.0
        return {"epsilon": epsilon, "delta": self.cfg.delta, "releases": releases, "preset": self.cfg.name,
                "noise_multiplier": self.noise, "sampling": self.sampling, "population": self.population,
                "target_epsilon": self.cfg.target_epsilon}

    def state(self) -> dict[str, Any]:
        """What a resume restores (the population too: the accountant is tied to it)."""
        return {"accountant": self.accountant.state_dict(), "population": self.population}

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of state()."""
        self.accountant.load_state_dict(state["accountant"])


class Private:
    """A DP preset's strategy: noise calibrated to the replies that are aggregated, one accounted release per
    aggregated round. The replies arrive weighted 1 each (server/strategy.py's Aggregator under a DP preset)."""

    ledger: Ledger
    num_sampled_clients: int
    clipping_norm: float

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies that arrived, add noise for that many, account the release."""
        replies = list(replies)
        if not replies:
            return None, None
        self.num_sampled_clients = len(replies)  # Flower's wrappers compute the noise stdev from this
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.ledger.compose()
            spent = self.ledger.spent()
            log.info("round %d: DP mean of %d clipped updates (C=%.4g); privacy spent epsilon=%.4f at delta=%g",
                     server_round, len(replies), self.clipping_norm, spent["epsilon"], spent["delta"])
        return arrays, metrics

    def privacy_state(self) -> dict[str, Any]:
        """Accountant (and the adaptive clipping norm) for checkpoints."""
        return {**self.ledger.state(), "clipping_norm": self.clipping_norm}

    def load_privacy_state(self, state: dict[str, Any]) -> None:
        """Inverse of privacy_state()."""
        self.ledger.load_state(state)
        self.clipping_norm = float(state["clipping_norm"])


class CentralFixed(Private, DifferentialPrivacyServerSideFixedClipping):
    """privacy=central: the server clips each update to C and noises the mean."""


class CentralAdaptive(AdaptiveNoiseFix, Private, DifferentialPrivacyServerSideAdaptiveClipping):
    """privacy=central_adaptive: as central, with C following a quantile of the update norms (the noise uses
    the C the updates were clipped to: patch 4 in server/flower_patches.py)."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """As Private, remembering this round's clipping norm for the noise."""
        self.remember_clipping_norm()
        return super().aggregate_train(server_round, replies)


class ClientFixed(Private, DifferentialPrivacyClientSideFixedClipping):
    """privacy=client: merchants clip (fixedclipping_mod); the server noises the mean."""


class _Delegate(Strategy):
    """A Strategy that forwards every call to `self.strategy`."""

    def __init__(self, strategy: FedAvg) -> None:
        self.strategy = strategy

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)


class LocalAccounted(Private, _Delegate):
    """privacy=local: merchants clip and noise (LocalDpMod); the server averages unweighted and accounts."""

    def __init__(self, strategy: FedAvg, ledger: Ledger, clipping_norm: float) -> None:
        super().__init__(strategy)
        self.ledger, self.clipping_norm, self.num_sampled_clients = ledger, clipping_norm, 0


def planned_sample(strategy: StrategyConfig, population: int) -> int:
    """How many merchants FedAvg samples per round out of `population` (Flower's rule)."""
    return max(int(population * strategy.fraction_train), strategy.min_train_nodes)


def make_private(inner: FedAvg, cfg: PrivacyConfig, strategy: StrategyConfig, population: int) -> Strategy:
    """Wrap `inner` for the privacy preset (`inner` itself when none)."""
    if not cfg.merchant_level:  # none, or example: the merchants' own DP-SGD, nothing on the server
        return inner
    population = cfg.population or population
    sample = planned_sample(strategy, population)
    ledger = Ledger(cfg, population, sample)
    wrapped: Any
    if cfg.name == "central":
        wrapped = CentralFixed(inner, _noise(cfg), cfg.clipping_norm, sample)
    elif cfg.name == "client":
        wrapped = ClientFixed(inner, _noise(cfg), cfg.clipping_norm, sample)
    elif cfg.name == "central_adaptive":
        wrapped = CentralAdaptive(inner, _noise(cfg), sample, initial_clipping_norm=cfg.clipping_norm,
                                  target_clipped_quantile=cfg.target_clipped_quantile,
                                  clip_norm_lr=cfg.clip_norm_lr, clipped_count_stddev=cfg.clipped_count_stddev)
    else:
        wrapped = LocalAccounted(inner, ledger, cfg.clipping_norm)
    wrapped.ledger = ledger
    return wrapped
