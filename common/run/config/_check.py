"""The one check every section's validation is made of."""

from __future__ import annotations

from typing import Any

from common.run.errors import FedshopError


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a FedshopError naming the key, its value and what it should be, unless ok."""
    if not ok:
        raise FedshopError(f"config {key}={value!r}: expected {expected}")
