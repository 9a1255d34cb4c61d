"""conf/config.yaml's `retrieval`: the dual encoder's own settings (common/tasks/retrieval.py)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from common.run.config._check import _check


@dataclass
class RetrievalConfig:
    """The listwise loss of the dual encoder."""

    temperature: float = MISSING  # logits are cosine / temperature (0.05: sentence-transformers' scale 20)
    gain_power: float = MISSING  # the training target is gain ** gain_power, normalised per query (1: the gains)


def validate_retrieval(r: RetrievalConfig) -> None:
    """A positive temperature and gain power."""
    _check(r.temperature > 0, "retrieval.temperature", r.temperature, "> 0")
    _check(r.gain_power > 0, "retrieval.gain_power", r.gain_power, "> 0")
