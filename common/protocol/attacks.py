"""Poisoned updates for robustness tests: what a malicious merchant could send instead of its own."""

from __future__ import annotations

import numpy as np

from common.run.config import ATTACKS


def poison(local: dict[str, np.ndarray], reference: dict[str, np.ndarray], kind: str,
           scale: float) -> dict[str, np.ndarray]:
    """sign_flip: reference - scale * update; scale: reference + scale * update (update = local - reference)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; expected one of {ATTACKS}")
    factor = -scale if kind == "sign_flip" else scale
    return {k: (reference[k] + factor * (v - reference[k])).astype(v.dtype) for k, v in local.items()}
