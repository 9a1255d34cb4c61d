"""The product catalog the service ranks: loaded from CSV / JSONL / Parquet and validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.run.errors import FedshopError
from common.tasks.data import read_file

REQUIRED = ("id", "title")
NUMERIC = ("price", "stock", "margin")


@dataclass(frozen=True)
class Product:
    """One catalog row."""

    id: str
    title: str
    category: str
    brand: str
    price: float | None
    stock: int | None
    margin: float | None
    promoted: bool


class Catalog:
    """Products by id, in file order."""

    def __init__(self, products: list[Product], source: str) -> None:
        self.products = products
        self.source = source
        self.by_id = {p.id: p for p in products}
        self.index = {p.id: i for i, p in enumerate(products)}

    def __len__(self) -> int:
        return len(self.products)


def _number(value: Any, where: str, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise FedshopError(f"{where}: column '{column}' must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise FedshopError(f"{where}: column '{column}' must be finite, got {value!r}")
    return out


def _flag(value: Any, where: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y"}:
        return True
    if text in {"0", "false", "no", "n"}:
        return False
    raise FedshopError(f"{where}: column 'promoted' must be true/false, got {value!r}")


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; errors name the file, row and column."""
    ds = read_file(path, field="serving.catalog")
    name = f"catalog {Path(path).expanduser()}"
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise FedshopError(f"{name}: missing column(s) {missing}; columns found: {', '.join(ds.column_names)}")
    products: list[Product] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(ds):
        where = f"{name} row {i + 2 if name.endswith('.csv') else i + 1}"
        pid = "" if row["id"] is None else str(row["id"]).strip()
        title = "" if row["title"] is None else str(row["title"]).strip()
        if not pid:
            raise FedshopError(f"{where}: empty 'id'")
        if not title:
            raise FedshopError(f"{where}: empty 'title' (product {pid})")
        if pid in seen:
            raise FedshopError(f"{where}: duplicate id {pid!r} (first at row {seen[pid]})")
        seen[pid] = i + 1
        nums = {c: _number(row.get(c), where, c) for c in NUMERIC}
        stock = nums["stock"]
        if stock is not None and (stock < 0 or stock != int(stock)):
            raise FedshopError(f"{where}: column 'stock' must be a whole number >= 0, got {row.get('stock')!r}")
        if nums["price"] is not None and nums["price"] < 0:
            raise FedshopError(f"{where}: column 'price' must be >= 0, got {row.get('price')!r}")
        products.append(Product(id=pid, title=title, category=str(row.get("category") or ""),
                                brand=str(row.get("brand") or ""), price=nums["price"],
                                stock=None if stock is None else int(stock), margin=nums["margin"],
                                promoted=_flag(row.get("promoted"), where)))
    return Catalog(products, name)
