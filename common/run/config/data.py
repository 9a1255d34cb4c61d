"""conf/data, conf/eval and conf/partition: where examples come from, how they are scored and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING

from common.run.config._check import _check

if TYPE_CHECKING:
    from common.run.config import FedshopConfig


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


def validate_data(cfg: FedshopConfig) -> None:
    """Check data, eval and partition, in that order."""
    _validate_source(cfg.data)
    _validate_eval(cfg.eval)
    _validate_partition(cfg)


def _validate_source(d: DataConfig) -> None:
    """Where examples come from, how they are read, and the built-in marketplace's test queries."""
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


def _validate_eval(e: EvalConfig) -> None:
    """How much of the test set every round scores, and the catalog ranking's depth."""
    _check(e.round_queries is None or e.round_queries >= 1, "eval.round_queries", e.round_queries,
           ">= 1, or null for the whole test set every round")
    _check(e.catalog_top_n >= 1, "eval.catalog_top_n", e.catalog_top_n, ">= 1")


def _validate_partition(cfg: FedshopConfig) -> None:
    """The partition scheme and what it needs: a merchant column (natural), alpha and a minimum size (dirichlet)."""
    d, p = cfg.data, cfg.partition
    _check(p.name in {"natural", "dirichlet", "iid"}, "partition.name", p.name, "natural|dirichlet|iid")
    _check(p.name != "natural" or bool(d.columns.merchant), "data.columns.merchant", d.columns.merchant,
           "a column name when partition=natural")
    _check(p.name != "dirichlet" or (p.alpha is not None and p.alpha > 0), "partition.alpha", p.alpha, "> 0")
    _check(p.name != "dirichlet" or (p.min_partition_size is not None and p.min_partition_size >= 0),
           "partition.min_partition_size", p.min_partition_size, ">= 0 with partition=dirichlet")
