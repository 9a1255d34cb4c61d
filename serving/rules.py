"""Business re-ranking on top of the model score: deterministic, and every move explained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.catalog import Product


@dataclass(frozen=True)
class Rules:
    """What the re-ranking does (conf/serving: rules.*)."""

    out_of_stock_penalty: float = 1.0   # subtracted from the score of a product with stock 0
    margin_weight: float = 0.0          # + margin_weight * margin
    promotion_boost: float = 0.0        # + promotion_boost for promoted products
    price_min: float | None = None      # products priced outside [price_min, price_max] are filtered out
    price_max: float | None = None
    max_per_category: int | None = None  # at most this many per category in the top k


@dataclass
class Ranked:
    """One product in a response."""

    product: Product
    model_score: float
    final_score: float = 0.0
    model_rank: int = 0
    rules: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, rank: int) -> dict[str, Any]:
        """The response entry."""
        p = self.product
        return {"rank": rank, "id": p.id, "title": p.title, "category": p.category, "brand": p.brand,
                "price": p.price, "stock": p.stock, "model_score": round(self.model_score, 6),
                "final_score": round(self.final_score, 6), "model_rank": self.model_rank, "rules": self.rules}


def rerank(items: list[Ranked], rules: Rules, k: int) -> tuple[list[Ranked], list[dict[str, Any]]]:
    """Apply the rules; returns the top k and the products the price filter removed (with the reason)."""
    by_model = sorted(items, key=lambda r: (-r.model_score, r.product.id))
    for i, r in enumerate(by_model):
        r.model_rank = i + 1
    kept, filtered = [], []
    for r in by_model:
        price = r.product.price
        if price is not None and rules.price_min is not None and price < rules.price_min:
            filtered.append({"id": r.product.id, "rule": "price_range", "reason": f"price {price} < {rules.price_min}"})
            continue
        if price is not None and rules.price_max is not None and price > rules.price_max:
            filtered.append({"id": r.product.id, "rule": "price_range", "reason": f"price {price} > {rules.price_max}"})
            continue
        kept.append(r)
    for r in kept:
        score = r.model_score
        if r.product.stock == 0 and rules.out_of_stock_penalty:
            score -= rules.out_of_stock_penalty
            r.rules.append({"rule": "out_of_stock", "delta": -rules.out_of_stock_penalty})
        if rules.margin_weight and r.product.margin:
            delta = rules.margin_weight * r.product.margin
            score += delta
            r.rules.append({"rule": "margin_boost", "delta": round(delta, 6)})
        if rules.promotion_boost and r.product.promoted:
            score += rules.promotion_boost
            r.rules.append({"rule": "promotion_boost", "delta": rules.promotion_boost})
        r.final_score = score
    ordered = sorted(kept, key=lambda r: (-r.final_score, -r.model_score, r.product.id))
    if rules.max_per_category is None:
        return ordered[:k], filtered
    top: list[Ranked] = []
    later: list[Ranked] = []
    per_category: dict[str, int] = {}
    for r in ordered:
        cat = r.product.category
        if len(top) < k and per_category.get(cat, 0) < rules.max_per_category:
            per_category[cat] = per_category.get(cat, 0) + 1
            top.append(r)
        else:
            if len(top) < k:
                r.rules.append({"rule": "category_diversity",
                                "reason": f"category {cat!r} already has {rules.max_per_category} in the top {k}"})
            later.append(r)
    return (top + later)[:k], filtered
