"""conf/simulation: K virtual merchants on one machine, some of them attackers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING

from common.run.config._check import _check

if TYPE_CHECKING:
    from common.run.config import FedshopConfig

ATTACKS = ("sign_flip", "scale")  # what a malicious merchant may send (common/protocol/attacks.py; robustness tests)


@dataclass
class SimulationConfig:
    """K virtual merchants on one machine."""

    num_merchants: int = MISSING
    client_cpus: float = MISSING
    client_gpus: float = MISSING
    attackers: list[int] = field(default_factory=list)
    attack: str = MISSING
    attack_scale: float = MISSING
    ray_address: str | None = None
    dashboard: bool = MISSING


def validate_simulation(cfg: FedshopConfig) -> None:
    """The merchant count, the attackers among them and their attack; the strategy's node minimums fit the count."""
    s, k = cfg.strategy, cfg.simulation.num_merchants
    _check(k > 0, "simulation.num_merchants", k, "> 0")
    _check(all(0 <= a < k for a in cfg.simulation.attackers), "simulation.attackers", cfg.simulation.attackers,
           f"partition ids in 0..{k - 1}")
    _check(s.min_available_nodes <= k, "strategy.min_available_nodes", s.min_available_nodes,
           f"<= simulation.num_merchants ({k})")
    _check(s.min_train_nodes <= k, "strategy.min_train_nodes", s.min_train_nodes,
           f"<= simulation.num_merchants ({k})")
    _check(cfg.simulation.attack in ATTACKS, "simulation.attack", cfg.simulation.attack, "|".join(ATTACKS))
