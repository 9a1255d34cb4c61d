"""conf/privacy and conf/secagg: differential privacy presets and secure aggregation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import MISSING

from common.run.config._check import _check

if TYPE_CHECKING:
    from common.run.config import FedshopConfig

MERCHANT_LEVEL = ("central", "central_adaptive", "client", "local")
PRIVACY = ("none", *MERCHANT_LEVEL, "example")


@dataclass
class PrivacyConfig:
    """Differential privacy preset (conf/privacy): clipping, noise, accounting and an epsilon budget."""

    name: str = MISSING  # none | central | central_adaptive | client | local | example
    clipping_norm: float = MISSING
    noise_multiplier: float | None = MISSING  # null (example only): derived from target_epsilon
    delta: float = MISSING
    target_epsilon: float | None = None
    population: int | None = None
    target_clipped_quantile: float = MISSING
    clip_norm_lr: float = MISSING
    clipped_count_stddev: float = MISSING
    local_epsilon: float = MISSING
    local_delta: float = MISSING
    grad_sample_mode: str = MISSING  # example: auto | hooks | ghost

    @property
    def merchant_level(self) -> bool:
        """A preset that protects whole merchants: clipped, noised, unweighted means of their updates."""
        return self.name in MERCHANT_LEVEL

    @property
    def record_level(self) -> bool:
        """privacy=example: DP-SGD on every merchant's own records, accounted by the merchant."""
        return self.name == "example"


@dataclass
class SecAggConfig:
    """Secure aggregation (conf/secagg): none, or Flower's SecAgg+ with its share and quantisation parameters."""

    name: str = MISSING  # none | plus
    num_shares: float = MISSING  # > 1: a count (an integer > 2); in (0, 1]: a fraction of the sampled merchants
    reconstruction_threshold: float = MISSING  # > 1: a count; in (0, 1]: a fraction of num_shares
    clipping_range: float = MISSING
    quantization_range: int = MISSING
    modulus_range: int = MISSING
    max_weight: float | None = None


def validate_privacy(cfg: FedshopConfig) -> None:
    """The preset's ranges, then what a merchant-level or record-level preset asks of the rest of the config."""
    dp = cfg.privacy
    _validate_ranges(dp)
    if dp.merchant_level:
        _check(dp.noise_multiplier is not None and dp.noise_multiplier > 0, "privacy.noise_multiplier",
               dp.noise_multiplier, f"> 0 with privacy={dp.name}")
        _check(cfg.strategy.name in {"fedavg", "fedprox"}, "strategy.name", cfg.strategy.name,
               f"fedavg or fedprox with privacy={dp.name} (its noise is calibrated to a mean of clipped updates)")
    if dp.record_level:
        _validate_record_level(cfg)


def _validate_ranges(dp: PrivacyConfig) -> None:
    """Every privacy field's range, whichever preset is chosen."""
    _check(dp.name in PRIVACY, "privacy.name", dp.name, "|".join(PRIVACY))
    _check(dp.clipping_norm > 0, "privacy.clipping_norm", dp.clipping_norm, "> 0")
    _check(dp.noise_multiplier is None or dp.noise_multiplier >= 0, "privacy.noise_multiplier",
           dp.noise_multiplier, ">= 0 or null")
    _check(0.0 < dp.delta < 1.0, "privacy.delta", dp.delta, "in (0, 1)")
    _check(dp.target_epsilon is None or dp.target_epsilon > 0, "privacy.target_epsilon", dp.target_epsilon,
           "> 0 or null")
    _check(dp.population is None or dp.population > 0, "privacy.population", dp.population, "> 0 or null")
    _check(0.0 <= dp.target_clipped_quantile <= 1.0, "privacy.target_clipped_quantile",
           dp.target_clipped_quantile, "in [0, 1]")
    _check(dp.clip_norm_lr > 0, "privacy.clip_norm_lr", dp.clip_norm_lr, "> 0")
    _check(dp.clipped_count_stddev >= 0, "privacy.clipped_count_stddev", dp.clipped_count_stddev, ">= 0")
    _check(dp.local_epsilon > 0, "privacy.local_epsilon", dp.local_epsilon, "> 0")
    _check(0.0 < dp.local_delta < 1.0, "privacy.local_delta", dp.local_delta, "in (0, 1)")
    _check(dp.grad_sample_mode in {"auto", "hooks", "ghost"}, "privacy.grad_sample_mode", dp.grad_sample_mode,
           "auto|hooks|ghost")


def _validate_record_level(cfg: FedshopConfig) -> None:
    """What privacy=example combines with: every strategy and SecAgg+ (they only post-process the merchants'
    DP-SGD models); not FedProx, whose proximal term is not a per-example loss, and only in a federation."""
    dp = cfg.privacy
    _check(dp.noise_multiplier is None and dp.target_epsilon is not None or bool(dp.noise_multiplier),
           "privacy.noise_multiplier", dp.noise_multiplier,
           "> 0, or null with privacy.target_epsilon set (the noise is derived from it)")
    _check(cfg.strategy.name != "fedprox", "strategy.name", cfg.strategy.name,
           "not fedprox with privacy=example: FedProx's proximal term is a gradient Opacus does not clip per "
           "example, so DP-SGD would drop it")
    _check(cfg.mode == "federated", "mode", cfg.mode,
           "federated with privacy=example: its budget is accounted by each merchant on its own records")
    _check(cfg.train.loss == "ce", "train.loss", cfg.train.loss,
           "ce with privacy=example: Opacus clips the cross-entropy's per-example gradients; balanced weights "
           "come from the merchant's label counts, which per-example clipping does not cover")


def validate_secagg(cfg: FedshopConfig) -> None:
    """With secagg=plus: its parameters, then what it asks of the strategy and the privacy preset."""
    sa = cfg.secagg
    _check(sa.name in {"none", "plus"}, "secagg.name", sa.name, "none|plus")
    if sa.name == "none":
        return
    _validate_secagg_parameters(sa)
    _validate_secagg_partners(cfg)


def _validate_secagg_parameters(sa: SecAggConfig) -> None:
    """Shares, reconstruction threshold, clipping, quantisation, modulus and weight bound."""
    for key in ("num_shares", "reconstruction_threshold"):
        value = getattr(sa, key)
        _check(0 < value <= 1 or (value > 2 and float(value).is_integer()), f"secagg.{key}", value,
               "a fraction in (0, 1] or an integer count > 2")
    _check(sa.num_shares <= 1 or sa.reconstruction_threshold <= 1 or sa.reconstruction_threshold < sa.num_shares,
           "secagg.reconstruction_threshold", sa.reconstruction_threshold, f"< secagg.num_shares ({sa.num_shares})")
    _check(sa.clipping_range > 0, "secagg.clipping_range", sa.clipping_range, "> 0")
    _check(sa.quantization_range > 0, "secagg.quantization_range", sa.quantization_range, "> 0")
    _check(sa.modulus_range > sa.quantization_range and sa.modulus_range & (sa.modulus_range - 1) == 0
           and sa.modulus_range <= 1 << 32, "secagg.modulus_range", sa.modulus_range,
           "a power of 2 above secagg.quantization_range, at most 2^32")
    _check(sa.max_weight is None or sa.max_weight > 0, "secagg.max_weight", sa.max_weight, "> 0 or null")


def _validate_secagg_partners(cfg: FedshopConfig) -> None:
    """The strategies, privacy presets, update bound and merchant count that SecAgg+ works with."""
    s = cfg.strategy
    _check(s.name in {"fedavg", "fedprox", "fedadam"}, "strategy.name", s.name,
           "fedavg, fedprox or fedadam with secagg=plus (the server sees only the sum of the updates, so a "
           "median, trimmed mean or Krum has nothing to compare)")
    _check(cfg.privacy.name in {"none", "client", "local", "example"}, "privacy.name", cfg.privacy.name,
           "none, client, local or example with secagg=plus (the server cannot clip updates it never sees)")
    _check(s.max_update_norm is None, "strategy.max_update_norm", s.max_update_norm,
           "null with secagg=plus (the server never sees one update; privacy=client bounds them on the merchant)")
    _check(s.min_train_nodes >= 2, "strategy.min_train_nodes", s.min_train_nodes,
           ">= 2 with secagg=plus (a sum of one update is that update)")
