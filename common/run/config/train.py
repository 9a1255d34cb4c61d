"""conf/train: local training on one merchant."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from common.run.config._check import _check


@dataclass
class TrainConfig:
    """Local training on one merchant."""

    local_epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    max_length: int = MISSING
    lr: float = MISSING
    warmup_ratio: float = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    loss: str = MISSING  # ce | balanced | focal
    focal_gamma: float = MISSING
    device: str = MISSING  # auto | cpu | cuda
    num_threads: int | None = None
    progress: bool = MISSING


def validate_train(t: TrainConfig) -> None:
    """Sizes, learning rate, warm-up, device and loss."""
    for key in ("local_epochs", "batch_size", "eval_batch_size", "max_length"):
        _check(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "> 0")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "a fraction in [0, 1)")
    _check(t.device in {"auto", "cpu", "cuda"}, "train.device", t.device, "auto|cpu|cuda")
    _check(t.loss in {"ce", "balanced", "focal"}, "train.loss", t.loss, "ce|balanced|focal")
    _check(t.focal_gamma >= 0, "train.focal_gamma", t.focal_gamma, ">= 0")
