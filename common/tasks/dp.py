"""Record-level differential privacy on one merchant (privacy=example): DP-SGD through Opacus.

Every optimiser step clips each example's gradient to C (Opacus's per-sample gradients), adds N(0, (z*C)^2) to
their sum and divides by the expected batch size; batches are Poisson samples (each record in with probability
q = 1 / steps-per-epoch), which is what the RDP accountant's subsampling bound assumes. Opacus's RDP accountant
composes the merchant's steps over every round it trains; its history (a list of (z, q, steps)) is what a
merchant keeps (client/client_app.py stores it in Context.state and in its run directory), so a restarted
merchant or a resumed run continues from what was spent.

The noise comes from torch's generator, seeded per round for reproducible runs: Opacus's secure_mode
(torchcsprng) is not installed, so the noise is not cryptographically strong.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.run.config import PrivacyConfig

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one entry of Opacus's accountant history


def epsilon(history: list[Step], delta: float) -> float:
    """(epsilon at delta) of a merchant's DP-SGD history with Opacus's RDP analysis (what its RDPAccountant
    computes, orders and conversion included); 0.0 before any step."""
    if not history:
        return 0.0
    if any(float(z) == 0.0 for z, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant  # here: importing Opacus costs every process 0.55 s
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * _rdp_per_step(float(z), float(q)) for z, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is looser, still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(z: float, q: float) -> np.ndarray:
    """One step's RDP curve at Opacus's orders (RDP composes additively: n steps cost n times this). Cached:
    planning a round evaluates the same history for every candidate noise multiplier."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate: one expected pass over the records in ceil(n / batch_size) steps (Opacus's rule)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_round(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps a merchant takes in one round."""
    return epochs * math.ceil(num_examples / batch_size)


def noise_for(target_epsilon: float, delta: float, rate: float, steps: int, history: list[Step] | None = None,
              tolerance: float = 1e-3) -> float:
    """Smallest noise multiplier (to `tolerance` relative) that keeps `history` plus `steps` more steps at
    `rate` within (target_epsilon, delta); inf when `history` alone is already past it."""
    history = list(history or [])
    if epsilon(history, delta) >= target_epsilon:
        return math.inf
    lo, hi = 0.0, 1.0
    while epsilon([*history, (hi, rate, steps)], delta) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon([*history, (mid, rate, steps)], delta) > target_epsilon else (lo, mid)
    return hi


@dataclass(frozen=True)
class RoundPlan:
    """A merchant's DP-SGD for its next round: the noise, the sampling, and the epsilon it would reach."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float


def plan_round(cfg: PrivacyConfig, batch_size: int, epochs: int, num_examples: int, history: list[Step],
               rounds_left: int) -> RoundPlan:
    """The next round's DP-SGD: privacy.noise_multiplier, or (null) the smallest noise that keeps this round and
    the `rounds_left - 1` after it within privacy.target_epsilon, assuming the merchant trains in all of them."""
    rate, steps = sample_rate(num_examples, batch_size), steps_per_round(num_examples, batch_size, epochs)
    z = cfg.noise_multiplier
    if z is None:
        assert cfg.target_epsilon is not None  # common/run/config/ refuses a null noise without a target
        z = noise_for(cfg.target_epsilon, cfg.delta, rate, steps * max(rounds_left, 1), history)
    after = math.inf if math.isinf(z) or z == 0 else epsilon([*history, (z, rate, steps)], cfg.delta)
    return RoundPlan(z, rate, steps, epsilon(history, cfg.delta), after)


def _takes_position_ids(model: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


@dataclass
class RecordDP:
    """One merchant's DP-SGD for one round: attaches Opacus to the training loop and extends its history."""

    noise_multiplier: float
    clipping_norm: float
    history: list[Step] = field(default_factory=list)  # what was spent before this round; extended by training
    mode: str = "hooks"  # Opacus's grad_sample_mode: hooks (per-sample gradients) | ghost (their norms only)
    poisson: bool = True  # False only to compare with ordinary training on the same batches (tests)
    _hooks: Any = None
    _criterion: Any = None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> tuple[torch.optim.Optimizer, DataLoader]:
        """The DP optimiser and Poisson loader over `model`'s trainable parameters (hooks added to `model`)."""
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(self.history)
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                   noise_multiplier=self.noise_multiplier, max_grad_norm=self.clipping_norm,
                                   poisson_sampling=self.poisson, grad_sample_mode=self.mode,
                                   criterion=torch.nn.CrossEntropyLoss(), wrap_model=False)
        if self.mode == "ghost":
            self._hooks, optimizer, self._criterion, loader = made
        else:
            self._hooks, optimizer, loader = made
        self._engine = engine
        return optimizer, loader

    def loss(self, out: Any, labels: torch.Tensor) -> Any:
        """The loss to call backward() on: the model's mean cross-entropy, or ghost clipping's two-pass loss."""
        return out.loss if self._criterion is None else self._criterion(out.logits, labels)

    @staticmethod
    def per_example_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` with one row of position ids per example: BERT's default is a single [1, L] row broadcast
        over the batch, which gives Opacus one per-sample gradient for the position embeddings instead of B."""
        if "position_ids" in batch or "input_ids" not in batch or not _takes_position_ids(model):
            return batch
        rows, length = batch["input_ids"].shape
        positions = torch.arange(length, device=batch["input_ids"].device).repeat(rows, 1)
        return {**batch, "position_ids": positions}

    def detach(self) -> None:
        """Remove Opacus's hooks and per-sample gradients from the model; keep the extended history."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self.history = [(float(z), float(q), int(n)) for z, q, n in self._engine.accountant.history]
            self._hooks = self._criterion = None
