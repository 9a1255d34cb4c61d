"""Typed configuration schema: the shape and types of conf/, validated up front.

Values live in conf/ (once); this package only declares their types and checks their ranges, one module per
section of conf/ (its dataclasses and their checks together); here, the whole config and its round trips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.run.config._check import _check
from common.run.config.data import (
    ColumnsConfig,
    DataConfig,
    EvalConfig,
    PartitionConfig,
    SyntheticConfig,
    validate_data,
)
from common.run.config.deploy import DeployConfig, validate_deploy
from common.run.config.model import FinetuneConfig, ModelConfig, validate_finetune, validate_model
from common.run.config.outputs import CheckpointConfig, LiveConfig, TrackingConfig, validate_outputs
from common.run.config.privacy import (
    MERCHANT_LEVEL,
    PRIVACY,
    PrivacyConfig,
    SecAggConfig,
    validate_privacy,
    validate_secagg,
)
from common.run.config.retrieval import RetrievalConfig, validate_retrieval
from common.run.config.serving import CompressConfig, RulesConfig, ServingConfig, validate_serving
from common.run.config.simulation import ATTACKS, SimulationConfig, validate_simulation
from common.run.config.strategy import (
    STRATEGIES,
    STRATEGY_FIELDS,
    WIRE_DTYPES,
    FedProxFields,
    KrumFields,
    RoundFields,
    ServerMomentumFields,
    ServerOptFields,
    StrategyConfig,
    TrimmedMeanFields,
    UpdateNormFields,
    validate_strategy,
)
from common.run.config.train import TrainConfig, validate_train
from common.run.errors import FedshopError

__all__ = [
    "ATTACKS", "CONF_DIR", "MERCHANT_LEVEL", "OBJECTIVES", "PRIVACY", "STRATEGIES", "STRATEGY_FIELDS", "WIRE_DTYPES",
    "CheckpointConfig", "ColumnsConfig", "CompressConfig", "DataConfig", "DeployConfig", "EvalConfig",
    "FedProxFields", "FedshopConfig", "FinetuneConfig", "KrumFields", "LiveConfig", "ModelConfig", "PartitionConfig",
    "PrivacyConfig", "RetrievalConfig", "RoundFields", "RulesConfig", "SecAggConfig", "ServerMomentumFields",
    "ServerOptFields",
    "ServingConfig", "SimulationConfig", "StrategyConfig", "SyntheticConfig", "TrackingConfig", "TrainConfig",
    "TrimmedMeanFields", "UpdateNormFields",
    "compose", "from_json", "from_run_config", "to_json", "to_typed", "training_json", "validate"]

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# conf/ may derive one value from another: `${times:2,${.noise_multiplier}}`.
# A null factor (privacy=example's noise_multiplier) gives 0.0: the value is then unused (validate() checks).
OmegaConf.register_new_resolver("times", lambda a, b: 0.0 if b is None else float(a) * float(b), replace=True)

OBJECTIVES = ("accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")


@dataclass
class FedshopConfig:
    """The whole composed configuration."""

    seed: int = MISSING
    mode: str = MISSING  # federated | centralized | alone
    objective: str = MISSING  # one of OBJECTIVES
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def validate(cfg: FedshopConfig) -> FedshopConfig:
    """Check value ranges and cross-field rules; return cfg unchanged when all hold."""
    _check(cfg.mode in {"federated", "centralized", "alone"}, "mode", cfg.mode, "federated|centralized|alone")
    _check(cfg.objective in OBJECTIVES, "objective", cfg.objective, "|".join(OBJECTIVES))
    validate_data(cfg)
    validate_model(cfg.model)
    validate_train(cfg.train)
    validate_finetune(cfg.finetune)
    validate_strategy(cfg.strategy)
    validate_deploy(cfg.deploy)
    validate_simulation(cfg)
    validate_privacy(cfg)
    validate_secagg(cfg)
    validate_serving(cfg.serving)
    validate_retrieval(cfg.retrieval)
    validate_outputs(cfg)
    return cfg


def to_typed(raw: DictConfig | dict[str, Any]) -> FedshopConfig:
    """Merge a composed config onto the schema (type-checking it) and validate ranges."""
    schema = OmegaConf.structured(FedshopConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
        typed: FedshopConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise FedshopError(f"config: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc
    return validate(typed)


def to_json(cfg: FedshopConfig) -> str:
    """Serialise a typed config to a canonical JSON string (stable key order)."""
    return json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), sort_keys=True)


def training_json(cfg: FedshopConfig) -> str:
    """to_json without the sections that do not change what is trained (deploy addresses, serving, what is kept,
    tracked and shown).

    Checkpoints are tied to this, so a resumed server may listen elsewhere, use other certificates, keep more
    checkpoints or log to another tracking server.
    """
    doc = json.loads(to_json(cfg))
    for key in ("deploy", "serving", "checkpoint", "tracking", "live"):
        doc.pop(key, None)
    return json.dumps(doc, sort_keys=True)


def from_json(text: str) -> FedshopConfig:
    """Inverse of to_json."""
    return to_typed(json.loads(text))


def compose(overrides: list[str] | None = None) -> FedshopConfig:
    """Compose conf/ with Hydra's compose API (outside a Hydra app), apply overrides, validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        raw = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_typed(raw)


def from_run_config(run_config: dict[str, Any]) -> FedshopConfig:
    """The config a Flower run carries: `config-json` (launchers) or `overrides` composed from conf/ (flwr run)."""
    if run_config.get("config-json"):
        return from_json(str(run_config["config-json"]))
    return compose(str(run_config.get("overrides", "")).split())
