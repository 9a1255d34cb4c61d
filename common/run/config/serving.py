"""conf/serving: the real-time ranking service, its business rules and its compressed forms."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from common.run.config._check import _check


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
    form: str | None = None
    int8_fp32_layers: list[int] = field(default_factory=list)
    catalog: str | None = None
    host: str = MISSING
    port: int = MISSING
    max_length: int = MISSING
    retriever: str | None = None
    reranker: str | None = None
    cache_dir: str | None = None
    min_agreement: float = MISSING
    force_form: bool = MISSING
    agreement_queries: str | None = None
    retrieve_top_n: int = MISSING
    default_k: int = MISSING
    max_k: int = MISSING
    max_candidates: int = MISSING
    max_query_chars: int = MISSING
    request_timeout: float = MISSING
    batch_max_requests: int = MISSING
    query_batch_max_requests: int = MISSING
    encoder_threads: int | None = None
    ann_min_products: int = MISSING
    ann_m: int = MISSING
    ann_ef_search: int = MISSING
    gains: dict[str, float] | None = None
    fallback_gains: dict[str, float] = field(default_factory=dict)
    rules: RulesConfig = field(default_factory=RulesConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)


def validate_serving(v: ServingConfig) -> None:
    """The service's limits, then its compressed forms, then its business rules."""
    _validate_service(v)
    _validate_compress(v.compress)
    _validate_rules(v.rules)


def _validate_service(v: ServingConfig) -> None:
    """The served form, sizes, k and the request timeout."""
    _check(v.form in {None, "fp32", "int8", "onnx", "onnx-int8"}, "serving.form", v.form,
           "fp32|int8|onnx|onnx-int8|null")
    for key in ("max_length", "retrieve_top_n", "default_k", "max_k", "max_candidates", "max_query_chars",
                "batch_max_requests", "query_batch_max_requests", "ann_min_products", "ann_m", "ann_ef_search"):
        _check(getattr(v, key) > 0, f"serving.{key}", getattr(v, key), "> 0")
    _check(v.default_k <= v.max_k, "serving.default_k", v.default_k, f"<= serving.max_k ({v.max_k})")
    _check(v.request_timeout > 0, "serving.request_timeout", v.request_timeout, "> 0")
    _check(0.0 <= v.min_agreement <= 1.0, "serving.min_agreement", v.min_agreement, "in [0, 1]")
    _check(v.encoder_threads is None or v.encoder_threads > 0, "serving.encoder_threads", v.encoder_threads,
           "> 0 or null")


def _validate_compress(c: CompressConfig) -> None:
    """The int8 agreement bar, the distilled student and the measurement sizes."""
    _check(0.0 < c.int8_agreement <= 1.0, "serving.compress.int8_agreement", c.int8_agreement, "in (0, 1]")
    _check(c.student_intermediate_size is None or c.student_intermediate_size > 0,
           "serving.compress.student_intermediate_size", c.student_intermediate_size, "> 0 or null")
    for key in ("distill_epochs", "distill_batch_size", "distill_pairs_per_query", "latency_candidates",
                "latency_repeats", "calibration_pairs"):
        _check(getattr(c, key) > 0, f"serving.compress.{key}", getattr(c, key), "> 0")
    _check(c.distill_lr > 0, "serving.compress.distill_lr", c.distill_lr, "> 0")


def _validate_rules(r: RulesConfig) -> None:
    """The per-category cap and the price window."""
    _check(r.max_per_category is None or r.max_per_category > 0, "serving.rules.max_per_category",
           r.max_per_category, "> 0 or null")
    _check(r.price_min is None or r.price_max is None or r.price_min <= r.price_max, "serving.rules.price_min",
           r.price_min, f"<= serving.rules.price_max ({r.price_max})")
