"""conf/strategy: the server's aggregation strategy and round schedule.

Every strategy's fields sit under the one Hydra key `strategy` (strategy.proximal_mu, strategy.eta, ...); each
family of strategies declares its own in a small dataclass below, with its checks, and StrategyConfig inherits
them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from common.run.config._check import _check

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg", "krum",
              "multikrum")
WIRE_DTYPES = ("float32", "float16")


# Read by every strategy (fedavg and fedmedian read nothing else).
@dataclass
class RoundFields:
    """Which strategy, the round schedule and sampling, and the dtype of the arrays that travel."""

    name: str = MISSING  # one of STRATEGIES
    num_rounds: int = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_train_nodes: int = MISSING
    min_evaluate_nodes: int = MISSING
    min_available_nodes: int = MISSING
    round_timeout: float = MISSING
    min_replies: int = MISSING
    round_retries: int = MISSING
    evaluate_with_train: bool = MISSING
    wire_dtype: str = MISSING  # float32 | float16: the arrays that travel (the server aggregates in float32)


def _check_choice(s: RoundFields) -> None:
    """The wire dtype and the strategy's name."""
    _check(s.wire_dtype in WIRE_DTYPES, "strategy.wire_dtype", s.wire_dtype, "|".join(WIRE_DTYPES))
    _check(s.name in STRATEGIES, "strategy.name", s.name, "|".join(STRATEGIES))


def _check_schedule(s: RoundFields) -> None:
    """Rounds, sampled fractions, replies, retries and the round timeout."""
    _check(s.num_rounds > 0, "strategy.num_rounds", s.num_rounds, "> 0")
    _check(0.0 < s.fraction_train <= 1.0, "strategy.fraction_train", s.fraction_train, "a fraction in (0, 1]")
    _check(0.0 <= s.fraction_evaluate <= 1.0, "strategy.fraction_evaluate", s.fraction_evaluate, "in [0, 1]")
    _check(s.min_replies >= 1, "strategy.min_replies", s.min_replies, ">= 1")
    _check(s.round_retries >= 0, "strategy.round_retries", s.round_retries, ">= 0")
    _check(s.round_timeout > 0, "strategy.round_timeout", s.round_timeout, "> 0")


# Read by fedprox (the merchants add the proximal term to their loss).
@dataclass
class FedProxFields:
    """FedProx's proximal term weight."""

    proximal_mu: float | None = None


_FEDPROX = {"fedprox": ("proximal_mu",)}


# Read by fedavgm.
@dataclass
class ServerMomentumFields:
    """FedAvgM's server learning rate and momentum."""

    server_learning_rate: float | None = None
    server_momentum: float | None = None


_SERVER_MOMENTUM = {"fedavgm": ("server_learning_rate", "server_momentum")}


# Read by fedadam and fedyogi (all five) and fedadagrad (no betas).
@dataclass
class ServerOptFields:
    """The server-side adaptive optimisers' step sizes, moment decays and adaptivity."""

    eta: float | None = None
    eta_l: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None


_SERVER_OPT = {"fedadam": ("eta", "eta_l", "beta_1", "beta_2", "tau"),
               "fedyogi": ("eta", "eta_l", "beta_1", "beta_2", "tau"), "fedadagrad": ("eta", "eta_l", "tau")}


# Read by every strategy: the server's reply check (server/strategy.py's Aggregator), not Flower's strategy.
@dataclass
class UpdateNormFields:
    """The largest update norm the server accepts (null: no bound)."""

    max_update_norm: float | None = None


def _check_update_norm(s: UpdateNormFields) -> None:
    """A positive bound, or none."""
    _check(s.max_update_norm is None or s.max_update_norm > 0, "strategy.max_update_norm", s.max_update_norm,
           "> 0 or null")


# Read by fedtrimmedavg.
@dataclass
class TrimmedMeanFields:
    """The fraction FedTrimmedAvg trims from each end."""

    beta: float | None = None


_TRIMMED_MEAN = {"fedtrimmedavg": ("beta",)}


def _check_trimmed_mean(s: TrimmedMeanFields) -> None:
    """A trimmed fraction below one half."""
    _check(s.beta is None or 0.0 <= s.beta < 0.5, "strategy.beta", s.beta, "a fraction in [0, 0.5)")


# Read by krum (num_malicious_nodes) and multikrum (both).
@dataclass
class KrumFields:
    """How many attackers Krum tolerates, and how many updates MultiKrum averages."""

    num_malicious_nodes: int | None = None
    num_nodes_to_select: int | None = None


_KRUM = {"krum": ("num_malicious_nodes",), "multikrum": ("num_malicious_nodes", "num_nodes_to_select")}


def _check_krum(s: KrumFields) -> None:
    """Non-negative attackers, at least one selected update."""
    _check(s.num_malicious_nodes is None or s.num_malicious_nodes >= 0, "strategy.num_malicious_nodes",
           s.num_malicious_nodes, ">= 0")
    _check(s.num_nodes_to_select is None or s.num_nodes_to_select >= 1, "strategy.num_nodes_to_select",
           s.num_nodes_to_select, ">= 1")


# The fields each strategy reads (conf/strategy/<name>.yaml sets them; null elsewhere).
STRATEGY_FIELDS = {**_FEDPROX, **_SERVER_OPT, **_SERVER_MOMENTUM, **_TRIMMED_MEAN, **_KRUM}


# A dataclass lays out its bases' fields from the last base to the first: listed in reverse, the families keep
# the field order StrategyConfig has always had (RoundFields' first, KrumFields' last).
@dataclass
class StrategyConfig(KrumFields, TrimmedMeanFields, UpdateNormFields, ServerOptFields, ServerMomentumFields,
                     FedProxFields, RoundFields):
    """Server aggregation strategy and round schedule."""


def _check_required(s: StrategyConfig) -> None:
    """Every field the chosen strategy reads is set."""
    for key in STRATEGY_FIELDS.get(s.name, ()):
        _check(getattr(s, key) is not None, f"strategy.{key}", getattr(s, key),
               f"a value for strategy={s.name} (conf/strategy/{s.name}.yaml sets it)")


def validate_strategy(s: StrategyConfig) -> None:
    """Each family's checks, in the order validate() has always run them."""
    _check_choice(s)
    _check_update_norm(s)
    _check_required(s)
    _check_trimmed_mean(s)
    _check_krum(s)
    _check_schedule(s)
