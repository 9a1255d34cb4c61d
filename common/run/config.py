"""Typed configuration schema: the shape and types of conf/, validated up front.

Values live in conf/ (once); this module only declares their types and checks their ranges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.run.errors import FedshopError

ATTACKS = ("sign_flip", "scale")  # what a malicious merchant may send (common/protocol/attacks.py; robustness tests)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# conf/ may derive one value from another: `${times:2,${.noise_multiplier}}`.
# A null factor (privacy=example's noise_multiplier) gives 0.0: the value is then unused (validate() checks).
OmegaConf.register_new_resolver("times", lambda a, b: 0.0 if b is None else float(a) * float(b), replace=True)


@dataclass
class SyntheticConfig:
    """Size and shape of the built-in marketplace."""

    num_merchants: int = MISSING
    num_queries: int = MISSING
    test_queries: int = MISSING
    hard_queries: int = MISSING
    num_reviews: int = MISSING
    concentration: float = MISSING
    label_noise: float = MISSING


@dataclass
class ColumnsConfig:
    """Which column of the user's file holds each field (null when absent)."""

    text: str = MISSING
    text_pair: str | None = None
    label: str = MISSING
    merchant: str | None = None
    query_id: str | None = None


@dataclass
class DataConfig:
    """Where examples come from and how they are read and validated."""

    source: str = MISSING  # synthetic | file
    task: str = MISSING  # a registered task (relevance, sentiment) or an import path package.module:Class
    path: str | None = None
    format: str = MISSING  # auto | csv | json | parquet
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    labels: list[str] | None = None
    gains: dict[str, float] = field(default_factory=dict)
    test_path: str | None = None  # a fixed held-out test file (then test_fraction is unused)
    test_fraction: float = MISSING
    val_fraction: float = MISSING
    max_text_chars: int = MISSING
    cache_dir: str | None = None  # where a file's Arrow cache goes (conf/data/*.yaml say what null means)
    num_proc: int = MISSING
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class EvalConfig:
    """The server's held-out evaluation: which part of it every round scores, and the catalog ranking."""

    round_queries: int | None = None  # null: the whole test set every round
    catalog_top_n: int = MISSING
    retriever: str | None = None  # null: serving.retriever


@dataclass
class PartitionConfig:
    """How the data is split into merchant shards."""

    name: str = MISSING  # natural | dirichlet | iid
    num_partitions: int | None = None
    alpha: float | None = None
    min_partition_size: int | None = None


@dataclass
class ModelConfig:
    """Which model to fine-tune; tiny_* describe the random-init test model."""

    name: str = MISSING  # minilm | tiny | local
    path: str | None = None
    tiny_hidden_size: int | None = None
    tiny_layers: int | None = None
    tiny_heads: int | None = None
    tiny_intermediate_size: int | None = None


@dataclass
class FinetuneConfig:
    """Which parameters train (conf/finetune): all of them, or LoRA adapters (peft) over a frozen base."""

    name: str = MISSING  # full | lora
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


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


@dataclass
class StrategyConfig:
    """Server aggregation strategy and round schedule."""

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
    proximal_mu: float | None = None
    server_learning_rate: float | None = None
    server_momentum: float | None = None
    eta: float | None = None
    eta_l: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    max_update_norm: float | None = None
    beta: float | None = None
    num_malicious_nodes: int | None = None
    num_nodes_to_select: int | None = None


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


@dataclass
class RulesConfig:
    """Business re-ranking on top of the model score (serving)."""

    out_of_stock_penalty: float = MISSING
    margin_weight: float = MISSING
    promotion_boost: float = MISSING
    price_min: float | None = None
    price_max: float | None = None
    max_per_category: int | None = None


@dataclass
class CompressConfig:
    """python -m serving.compress: the serving forms and how they are measured."""

    out_dir: str | None = None
    queries: str | None = None
    query_log: str | None = None
    student_layers: list[int] = field(default_factory=list)
    student_intermediate_size: int | None = None
    int8_agreement: float = MISSING
    calibration_pairs: int = MISSING
    distill_epochs: int = MISSING
    distill_lr: float = MISSING
    distill_batch_size: int = MISSING
    distill_pairs_per_query: int = MISSING
    latency_candidates: int = MISSING
    latency_repeats: int = MISSING


@dataclass
class ServingConfig:
    """The real-time ranking service (python -m serving)."""

    model_dir: str | None = None
    form: str = MISSING
    int8_fp32_layers: list[int] = field(default_factory=list)
    catalog: str | None = None
    host: str = MISSING
    port: int = MISSING
    max_length: int = MISSING
    retriever: str | None = None
    retrieve_top_n: int = MISSING
    default_k: int = MISSING
    max_k: int = MISSING
    max_candidates: int = MISSING
    max_query_chars: int = MISSING
    request_timeout: float = MISSING
    batch_max_requests: int = MISSING
    ann_min_products: int = MISSING
    ann_m: int = MISSING
    ann_ef_search: int = MISSING
    gains: dict[str, float] | None = None
    fallback_gains: dict[str, float] = field(default_factory=dict)
    rules: RulesConfig = field(default_factory=RulesConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)


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


OBJECTIVES = ("accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg", "krum",
              "multikrum")
# The fields each strategy reads (conf/strategy/<name>.yaml sets them; null elsewhere).
STRATEGY_FIELDS = {"fedprox": ("proximal_mu",), "fedadam": ("eta", "eta_l", "beta_1", "beta_2", "tau"),
                   "fedyogi": ("eta", "eta_l", "beta_1", "beta_2", "tau"), "fedadagrad": ("eta", "eta_l", "tau"),
                   "fedavgm": ("server_learning_rate", "server_momentum"),
                   "fedtrimmedavg": ("beta",), "krum": ("num_malicious_nodes",),
                   "multikrum": ("num_malicious_nodes", "num_nodes_to_select")}
WIRE_DTYPES = ("float32", "float16")
MERCHANT_LEVEL = ("central", "central_adaptive", "client", "local")
PRIVACY = ("none", *MERCHANT_LEVEL, "example")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise FedshopError(f"config {key}={value!r}: expected {expected}")


def validate(cfg: FedshopConfig) -> FedshopConfig:
    """Check value ranges and cross-field rules; return cfg unchanged when all hold."""
    _check(cfg.mode in {"federated", "centralized", "alone"}, "mode", cfg.mode, "federated|centralized|alone")
    _check(cfg.objective in OBJECTIVES, "objective", cfg.objective, "|".join(OBJECTIVES))
    _validate_data(cfg)
    _validate_train(cfg.train)
    _validate_finetune(cfg.finetune)
    _validate_strategy(cfg)
    _validate_simulation(cfg)
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    _validate_serving(cfg.serving)
    _validate_outputs(cfg)
    return cfg


def _validate_outputs(cfg: FedshopConfig) -> None:
    """What a run keeps, tracks and shows."""
    tr = cfg.tracking
    _check(tr.name in {"none", "mlflow"}, "tracking.name", tr.name, "none|mlflow")
    _check(tr.name == "none" or bool(tr.experiment), "tracking.experiment", tr.experiment,
           "a name with tracking=mlflow")
    _check(tr.name == "none" or bool(tr.uri or tr.local_dir), "tracking.local_dir", tr.local_dir,
           "a directory when tracking.uri is null")
    _check(cfg.live.port is None or 0 <= cfg.live.port < 65536, "live.port", cfg.live.port,
           "a TCP port, 0 for any free one, or null for no page")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last,
           ">= 1 (resuming needs the newest checkpoint)")
    _check(cfg.checkpoint.best_mode in {"max", "min"}, "checkpoint.best_mode", cfg.checkpoint.best_mode, "max|min")


def _validate_data(cfg: FedshopConfig) -> None:
    d = cfg.data
    _check(d.source in {"synthetic", "file"}, "data.source", d.source, "synthetic|file")
    _check(bool(d.task), "data.task", d.task, "a task name or import path (common/tasks/registry.py checks it)")
    _check(d.source != "file" or bool(d.path), "data.path", d.path, "a file path when data.source=file")
    _check(d.format in {"auto", "csv", "json", "parquet"}, "data.format", d.format, "auto|csv|json|parquet")
    _check(0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "a fraction in (0, 1)")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a fraction in [0, 1)")
    _check(d.max_text_chars > 0, "data.max_text_chars", d.max_text_chars, "> 0")
    _check(d.num_proc >= 1, "data.num_proc", d.num_proc, ">= 1")
    s = d.synthetic
    _check(d.source != "synthetic" or s.test_queries >= 1, "data.synthetic.test_queries", s.test_queries, ">= 1")
    _check(d.source != "synthetic" or s.hard_queries >= 0, "data.synthetic.hard_queries", s.hard_queries, ">= 0")
    e = cfg.eval
    _check(e.round_queries is None or e.round_queries >= 1, "eval.round_queries", e.round_queries,
           ">= 1, or null for the whole test set every round")
    _check(e.catalog_top_n >= 1, "eval.catalog_top_n", e.catalog_top_n, ">= 1")
    p = cfg.partition
    _check(p.name in {"natural", "dirichlet", "iid"}, "partition.name", p.name, "natural|dirichlet|iid")
    _check(p.name != "natural" or bool(d.columns.merchant), "data.columns.merchant", d.columns.merchant,
           "a column name when partition=natural")
    _check(p.name != "dirichlet" or (p.alpha is not None and p.alpha > 0), "partition.alpha", p.alpha, "> 0")
    _check(p.name != "dirichlet" or (p.min_partition_size is not None and p.min_partition_size >= 0),
           "partition.min_partition_size", p.min_partition_size, ">= 0 with partition=dirichlet")
    _check(cfg.model.name in {"minilm", "tiny", "local"}, "model.name", cfg.model.name, "minilm|tiny|local")
    _check(cfg.model.name != "local" or bool(cfg.model.path), "model.path", cfg.model.path,
           "a local Hugging Face model directory when model=local")


def _validate_train(t: TrainConfig) -> None:
    for key in ("local_epochs", "batch_size", "eval_batch_size", "max_length"):
        _check(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "> 0")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "a fraction in [0, 1)")
    _check(t.device in {"auto", "cpu", "cuda"}, "train.device", t.device, "auto|cpu|cuda")
    _check(t.loss in {"ce", "balanced", "focal"}, "train.loss", t.loss, "ce|balanced|focal")
    _check(t.focal_gamma >= 0, "train.focal_gamma", t.focal_gamma, ">= 0")


def _validate_finetune(f: FinetuneConfig) -> None:
    _check(f.name in {"full", "lora"}, "finetune.name", f.name, "full|lora")
    if f.name == "lora":
        _check(f.rank is not None and f.rank > 0, "finetune.rank", f.rank, "> 0 with finetune=lora")
        _check(f.alpha is not None and f.alpha > 0, "finetune.alpha", f.alpha, "> 0 with finetune=lora")
        _check(f.dropout is not None and 0.0 <= f.dropout < 1.0, "finetune.dropout", f.dropout,
               "a fraction in [0, 1) with finetune=lora")
        _check(bool(f.target_modules), "finetune.target_modules", f.target_modules,
               "module names to adapt with finetune=lora")


def _validate_strategy(cfg: FedshopConfig) -> None:
    s = cfg.strategy
    _check(s.wire_dtype in WIRE_DTYPES, "strategy.wire_dtype", s.wire_dtype, "|".join(WIRE_DTYPES))
    _check(s.name in STRATEGIES, "strategy.name", s.name, "|".join(STRATEGIES))
    _check(s.max_update_norm is None or s.max_update_norm > 0, "strategy.max_update_norm", s.max_update_norm,
           "> 0 or null")
    for key in STRATEGY_FIELDS.get(s.name, ()):
        _check(getattr(s, key) is not None, f"strategy.{key}", getattr(s, key),
               f"a value for strategy={s.name} (conf/strategy/{s.name}.yaml sets it)")
    _check(s.beta is None or 0.0 <= s.beta < 0.5, "strategy.beta", s.beta, "a fraction in [0, 0.5)")
    _check(s.num_malicious_nodes is None or s.num_malicious_nodes >= 0, "strategy.num_malicious_nodes",
           s.num_malicious_nodes, ">= 0")
    _check(s.num_nodes_to_select is None or s.num_nodes_to_select >= 1, "strategy.num_nodes_to_select",
           s.num_nodes_to_select, ">= 1")
    _check(s.num_rounds > 0, "strategy.num_rounds", s.num_rounds, "> 0")
    _check(0.0 < s.fraction_train <= 1.0, "strategy.fraction_train", s.fraction_train, "a fraction in (0, 1]")
    _check(0.0 <= s.fraction_evaluate <= 1.0, "strategy.fraction_evaluate", s.fraction_evaluate, "in [0, 1]")
    _check(s.min_replies >= 1, "strategy.min_replies", s.min_replies, ">= 1")
    _check(s.round_retries >= 0, "strategy.round_retries", s.round_retries, ">= 0")
    _check(s.round_timeout > 0, "strategy.round_timeout", s.round_timeout, "> 0")



def _validate_simulation(cfg: FedshopConfig) -> None:
    s = cfg.strategy
    _check(cfg.deploy.executor in {"resident", "forkserver", "subprocess"}, "deploy.executor", cfg.deploy.executor,
           "resident|forkserver|subprocess")
    k = cfg.simulation.num_merchants
    _check(k > 0, "simulation.num_merchants", k, "> 0")
    _check(all(0 <= a < k for a in cfg.simulation.attackers), "simulation.attackers", cfg.simulation.attackers,
           f"partition ids in 0..{k - 1}")
    _check(s.min_available_nodes <= k, "strategy.min_available_nodes", s.min_available_nodes,
           f"<= simulation.num_merchants ({k})")
    _check(s.min_train_nodes <= k, "strategy.min_train_nodes", s.min_train_nodes,
           f"<= simulation.num_merchants ({k})")
    _check(cfg.simulation.attack in ATTACKS, "simulation.attack", cfg.simulation.attack, "|".join(ATTACKS))


def _validate_privacy(cfg: FedshopConfig) -> None:
    dp = cfg.privacy
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
    if dp.merchant_level:
        _check(dp.noise_multiplier is not None and dp.noise_multiplier > 0, "privacy.noise_multiplier",
               dp.noise_multiplier, f"> 0 with privacy={dp.name}")
        _check(cfg.strategy.name in {"fedavg", "fedprox"}, "strategy.name", cfg.strategy.name,
               f"fedavg or fedprox with privacy={dp.name} (its noise is calibrated to a mean of clipped updates)")
    if dp.record_level:
        _validate_record_level(cfg)


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


def _validate_serving(v: ServingConfig) -> None:
    _check(v.form in {"fp32", "int8", "onnx", "onnx-int8"}, "serving.form", v.form, "fp32|int8|onnx|onnx-int8")
    for key in ("max_length", "retrieve_top_n", "default_k", "max_k", "max_candidates", "max_query_chars",
                "batch_max_requests", "ann_min_products", "ann_m", "ann_ef_search"):
        _check(getattr(v, key) > 0, f"serving.{key}", getattr(v, key), "> 0")
    _check(v.default_k <= v.max_k, "serving.default_k", v.default_k, f"<= serving.max_k ({v.max_k})")
    _check(v.request_timeout > 0, "serving.request_timeout", v.request_timeout, "> 0")
    c = v.compress
    _check(0.0 < c.int8_agreement <= 1.0, "serving.compress.int8_agreement", c.int8_agreement, "in (0, 1]")
    _check(c.student_intermediate_size is None or c.student_intermediate_size > 0,
           "serving.compress.student_intermediate_size", c.student_intermediate_size, "> 0 or null")
    for key in ("distill_epochs", "distill_batch_size", "distill_pairs_per_query", "latency_candidates",
                "latency_repeats", "calibration_pairs"):
        _check(getattr(c, key) > 0, f"serving.compress.{key}", getattr(c, key), "> 0")
    _check(c.distill_lr > 0, "serving.compress.distill_lr", c.distill_lr, "> 0")
    r = v.rules
    _check(r.max_per_category is None or r.max_per_category > 0, "serving.rules.max_per_category",
           r.max_per_category, "> 0 or null")
    _check(r.price_min is None or r.price_max is None or r.price_min <= r.price_max, "serving.rules.price_min",
           r.price_min, f"<= serving.rules.price_max ({r.price_max})")


def _validate_secagg(cfg: FedshopConfig) -> None:
    sa, s = cfg.secagg, cfg.strategy
    _check(sa.name in {"none", "plus"}, "secagg.name", sa.name, "none|plus")
    if sa.name == "none":
        return
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
    _check(s.name in {"fedavg", "fedprox", "fedadam"}, "strategy.name", s.name,
           "fedavg, fedprox or fedadam with secagg=plus (the server sees only the sum of the updates, so a "
           "median, trimmed mean or Krum has nothing to compare)")
    _check(cfg.privacy.name in {"none", "client", "local", "example"}, "privacy.name", cfg.privacy.name,
           "none, client, local or example with secagg=plus (the server cannot clip updates it never sees)")
    _check(s.max_update_norm is None, "strategy.max_update_norm", s.max_update_norm,
           "null with secagg=plus (the server never sees one update; privacy=client bounds them on the merchant)")
    _check(s.min_train_nodes >= 2, "strategy.min_train_nodes", s.min_train_nodes,
           ">= 2 with secagg=plus (a sum of one update is that update)")


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
