"""Flower 1.39's DP clipping divides by the update's norm: an update of exactly zero (a merchant whose
training did not move the model, or one that sends the global model back) raises ZeroDivisionError and
fails the whole round. install() swaps in clipping that leaves a zero update as it is; the ClientApp
(fixedclipping_mod, LocalDpMod) and the server's DP wrappers both install it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _scale_to(arrays: list[np.ndarray], clipping_norm: float) -> bool:
    """Scale arrays in place onto the L2 ball of radius clipping_norm; True when they were scaled."""
    from flwr.supercore.differential_privacy import get_norm

    norm = get_norm(arrays)
    if norm <= clipping_norm:
        return False
    for array in arrays:
        array *= clipping_norm / norm
    return True


def clip_inputs_inplace(input_arrays: list[np.ndarray], clipping_norm: float) -> None:
    """Flower's FlatClip, zero-safe."""
    _scale_to(input_arrays, clipping_norm)


def adaptive_clip_inputs_inplace(input_arrays: list[np.ndarray], clipping_norm: float) -> bool:
    """Flower's adaptive FlatClip, zero-safe; returns whether the update was clipped (its norm bit)."""
    return _scale_to(input_arrays, clipping_norm)


def install() -> None:
    """Point Flower's DP helpers (and the adaptive wrapper, which imported its own reference) at these."""
    import flwr.serverapp.strategy.dp_adaptive_clipping as adaptive
    import flwr.supercore.differential_privacy as dp

    module: Any
    for module in (dp, adaptive):
        module.adaptive_clip_inputs_inplace = adaptive_clip_inputs_inplace
    dp.clip_inputs_inplace = clip_inputs_inplace
