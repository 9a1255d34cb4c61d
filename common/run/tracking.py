"""Experiment tracking in MLflow (tracking=mlflow): the resolved config as parameters, every round's metrics,
bytes and epsilon, and the final model directory as an artifact. results.json and TensorBoard stay the record;
a tracking server that goes away mid-run costs its metrics there (logged once as a warning), never the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from common.run.config import FedshopConfig, TrackingConfig, to_json
from common.run.errors import FedshopError

log = logging.getLogger(__name__)

GROUPS = {"server": "server", "train": "merchants_train", "evaluate": "merchants_eval"}
# MLflow's HTTP client retries a dead server for minutes by default (a run should say so within seconds), and
# MLflow gives its logger a console handler of its own (its INFO lines then belong in fedshop.log, not the console).
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                "MLFLOW_CONFIGURE_LOGGING": "false"}


def metric_name(group: str, key: str) -> str:
    """`server/ndcg_at_10`: MLflow names allow letters, digits, _ - . / and spaces, not `@`."""
    return re.sub(r"[^\w\-./ ]", "_", f"{group}/{key}".replace("@", "_at_"))


def flat_params(cfg: FedshopConfig) -> dict[str, str]:
    """The resolved config as MLflow parameters: `train.lr` -> "0.002" (lists and nulls as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", json.loads(to_json(cfg)))
    return out


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One results.json round as MLflow metrics: server and aggregated merchant metrics, bytes, epsilon, time."""
    out = {metric_name(GROUPS[g], k): float(v) for g in GROUPS for k, v in (record.get(g) or {}).items()
           if isinstance(v, int | float) and not isinstance(v, bool)}
    for key, name in (("bytes_down_total", "bytes/down"), ("bytes_up_total", "bytes/up"), ("seconds", "round/seconds")):
        if isinstance(record.get(key), int | float):
            out[name] = float(record[key])
    if isinstance((record.get("privacy") or {}).get("epsilon"), int | float):
        out["privacy/epsilon"] = float(record["privacy"]["epsilon"])
    if isinstance((record.get("record_privacy") or {}).get("epsilon_max"), int | float):
        out["privacy/record_epsilon_max"] = float(record["record_privacy"]["epsilon_max"])
    return out


class MlflowTracker:
    """One MLflow run per fedshop run directory; a resumed run directory continues its MLflow run."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, params: dict[str, str], tags: dict[str, str]) -> None:
        for key, value in ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise FedshopError("tracking=mlflow needs MLflow in this environment: pip install -e '.[tracking]' "
                               f"({exc})") from exc

        local = Path(cfg.local_dir or "mlruns").expanduser().resolve()
        if not cfg.uri:  # MLflow 3 refuses a plain directory as a store; a SQLite file in one it takes
            local.mkdir(parents=True, exist_ok=True)
        self.uri = cfg.uri or f"sqlite:///{local / 'mlflow.db'}"
        self.artifacts = None if cfg.uri else (local / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.failed = False
        try:
            self.run_id = self._resumed(run_dir) or self._new_run(cfg, run_dir, params, tags)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own, requests' and OS errors alike
            raise FedshopError(f"tracking.uri={self.uri}: could not start an MLflow run ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); is the MLflow server up?") from exc
        log.info("MLflow run %s at %s", self.run_id, self.uri)

    def _resumed(self, run_dir: Path) -> str | None:
        """The MLflow run this run directory logged to before (a resumed server), reopened."""
        results = run_dir / "results.json"
        prior = json.loads(results.read_text()).get("tracking") if results.is_file() else None
        if not prior or prior.get("uri") != self.uri:
            return None
        self.client.update_run(prior["run_id"], status="RUNNING")
        return str(prior["run_id"])

    def _new_run(self, cfg: TrackingConfig, run_dir: Path, params: dict[str, str], tags: dict[str, str]) -> str:
        name = str(cfg.experiment)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=self.artifacts)
        run = self.client.create_run(experiment, run_name=cfg.run_name or run_dir.name,
                                     tags={**tags, "fedshop.run_dir": str(run_dir)})
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return str(run.info.run_id)

    def as_json(self) -> dict[str, str]:
        """results.json's `tracking`."""
        return {"uri": self.uri, "run_id": self.run_id}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a federation
            self.failed = True
            log.warning("MLflow: %s failed (%s: %s); results.json keeps every round, MLflow gets no more",
                        what, exc.__class__.__name__, exc)

    def log_round(self, record: dict[str, Any]) -> None:
        """Every metric of one round, at step = round."""
        from mlflow.entities import Metric

        step, now = int(record["round"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_metrics(record).items()]
        if metrics:
            self._call(f"logging round {step}", self.client.log_batch, self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, status: str) -> None:
        """The final model (model/, adapter/), results.json and the plot as artifacts; the run ended."""
        for name in ("model", "adapter"):
            if (run_dir / name).is_dir():
                self._call(f"uploading {name}/", self.client.log_artifacts, self.run_id, str(run_dir / name), name)
        for name in ("results.json", "metrics.png", "confusion.png", "resolved_config.yaml"):
            if (run_dir / name).is_file():
                self._call(f"uploading {name}", self.client.log_artifact, self.run_id, str(run_dir / name))
        self._call("ending the run", self.client.set_terminated, self.run_id,
                   "FINISHED" if status in {"completed", "stopped_privacy_budget"} else "FAILED")


def open_tracker(cfg: FedshopConfig, run_dir: Path, mode: str) -> MlflowTracker | None:
    """The run's tracker, or None with tracking=none."""
    if cfg.tracking.name == "none":
        return None
    return MlflowTracker(cfg.tracking, run_dir, flat_params(cfg), {"fedshop.mode": mode})
