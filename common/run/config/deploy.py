"""conf/deploy: the server and merchant processes over gRPC."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from common.run.config._check import _check


@dataclass
class DeployConfig:
    """Server and merchant processes over gRPC (Flower SuperLink / SuperNodes)."""

    host: str = MISSING
    fleet_port: int = MISSING
    api_port: int = MISSING
    health_port: int = MISSING
    poll_interval: float = MISSING
    audit_messages: bool = MISSING
    insecure: bool = MISSING
    auth: bool = MISSING
    certs: str = MISSING
    merchant_keys: list[str] | None = None
    superlink: str = MISSING
    shard: str | None = None
    model_path: str | None = None
    merchant_index: int = MISSING
    merchant_name: str | None = None
    key: str | None = None
    node_port: int = MISSING
    executor: str = MISSING
    connect_retries: int = MISSING
    connect_wait: float = MISSING


def validate_deploy(d: DeployConfig) -> None:
    """How a merchant runs its tasks."""
    _check(d.executor in {"resident", "forkserver", "subprocess"}, "deploy.executor", d.executor,
           "resident|forkserver|subprocess")
