"""conf/checkpoint, conf/tracking and conf/live: what a run keeps, tracks and shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import MISSING

from common.run.config._check import _check

if TYPE_CHECKING:
    from common.run.config import FedshopConfig


@dataclass
class CheckpointConfig:
    """Which round checkpoints a run keeps."""

    keep_last: int = MISSING
    best_metric: str | None = None
    best_mode: str = MISSING  # max | min


@dataclass
class TrackingConfig:
    """Experiment tracking (conf/tracking/)."""

    name: str = MISSING  # none | mlflow
    uri: str | None = None
    local_dir: str | None = None
    experiment: str | None = None
    run_name: str | None = None


@dataclass
class LiveConfig:
    """The live federation page the server serves on 127.0.0.1 while a run is on."""

    port: int | None = None  # null: no page


def validate_outputs(cfg: FedshopConfig) -> None:
    """What a run keeps, tracks and shows: tracking, then the live page, then checkpoints."""
    _validate_tracking(cfg.tracking)
    _check(cfg.live.port is None or 0 <= cfg.live.port < 65536, "live.port", cfg.live.port,
           "a TCP port, 0 for any free one, or null for no page")
    _validate_checkpoint(cfg.checkpoint)


def _validate_tracking(tr: TrackingConfig) -> None:
    """The tracking backend, and where an MLflow run goes."""
    _check(tr.name in {"none", "mlflow"}, "tracking.name", tr.name, "none|mlflow")
    _check(tr.name == "none" or bool(tr.experiment), "tracking.experiment", tr.experiment,
           "a name with tracking=mlflow")
    _check(tr.name == "none" or bool(tr.uri or tr.local_dir), "tracking.local_dir", tr.local_dir,
           "a directory when tracking.uri is null")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    """How many checkpoints are kept, and which way the best one is picked."""
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, ">= 1 (resuming needs the newest checkpoint)")
    _check(c.best_mode in {"max", "min"}, "checkpoint.best_mode", c.best_mode, "max|min")
