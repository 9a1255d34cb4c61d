"""Numerics the server and the merchants share with Flower's DP and SecAgg+ code (installed by the patch modules,
server/flower_patches.py and client/flower_patches.py): zero-safe L2 clipping and AES-CTR masks."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray


def l2_norm(arrays: list[np.ndarray]) -> float:
    """The L2 norm of all arrays flattened together, computed as Flower's get_norm does (same rounding)."""
    return float(np.sqrt(sum(np.linalg.norm(a.flat) ** 2 for a in arrays)))


def scale_to(arrays: list[np.ndarray], clipping_norm: float) -> bool:
    """Scale arrays in place onto the L2 ball of radius clipping_norm; True when they were scaled.

    A zero update is inside every ball and is left as it is (Flower 1.39 divides by its norm).
    """
    norm = l2_norm(arrays)
    if norm <= clipping_norm:
        return False
    for array in arrays:
        array *= clipping_norm / norm
    return True


def clip_inputs_inplace(input_arrays: list[np.ndarray], clipping_norm: float) -> None:
    """Flower's FlatClip (flwr.supercore.differential_privacy.clip_inputs_inplace), zero-safe."""
    scale_to(input_arrays, clipping_norm)


def adaptive_clip_inputs_inplace(input_arrays: list[np.ndarray], clipping_norm: float) -> bool:
    """Flower's adaptive FlatClip, zero-safe; returns whether the update was clipped (its norm bit)."""
    return scale_to(input_arrays, clipping_norm)


def mask(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[NDArray[np.int64]]:
    """Uniform integers in [0, num_range) shaped as dimensions_list, from AES-256-CTR keyed by SHA-256(seed).

    Flower's own generator seeds numpy with a 32-bit fold of the 256-bit shared secret, so a server could
    search all 2^32 seeds for a merchant's private mask; this one uses the whole secret.
    """
    if num_range & (num_range - 1) or not 1 < num_range <= 1 << 32:
        raise ValueError(f"SecAgg+ modulus {num_range}: expected a power of 2 in (1, 2^32]")
    sizes = [int(np.prod(d)) for d in dimensions_list]
    encryptor = Cipher(algorithms.AES(hashlib.sha256(seed).digest()), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * sum(sizes))) + encryptor.finalize()
    values = (np.frombuffer(stream, dtype="<u4") & np.uint32(num_range - 1)).astype(np.int64)
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        out.append(values[start:start + size].reshape(shape))
        start += size
    return out
