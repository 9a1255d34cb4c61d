"""SecAgg+ on the merchant: Flower's secaggplus_mod around the train handler, bridged to the legacy format.

Flower's SecAgg+ lives in the older FitIns/FitRes API: secaggplus_mod hands the training stage on in the
legacy layout and quantises and masks the parameters of the FitRes it gets back. The bridge turns that
FitIns into the content the train handler reads ({"arrays", "config"}), and the handler's reply into a
FitRes whose parameters are the *update* (trained - received) rather than the model: an update is small,
so quantising it over [-secagg.clipping_range, +secagg.clipping_range] loses far less than quantising the
weights over Flower's [-8, 8]. The server adds the securely averaged update to the global model.

Flower derives every mask from a 32-bit fold of its 256-bit secret (numpy's RandomState seed), so a server
could search all 2^32 seeds for a merchant's private mask. `install()` swaps in masks drawn from AES-256-CTR
keyed by SHA-256 of the whole secret, on both sides (the server imports this module too).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_workflow
from numpy.typing import NDArray

from common.config import FedshopConfig

# The modules (the package re-exports a function of the same name) whose mask generator install() replaces.
flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

# The FitIns config carries the global model's array names, one per line (legacy Parameters are an unnamed
# list, and a legacy config holds no lists).
NAMES_KEY = "fedshop-array-names"
# Update coordinates beyond secagg.clipping_range (quantisation clips them); reported as a train metric.
CLIPPED_KEY = "secagg-clipped-values"


def mask(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[NDArray[np.int64]]:
    """Uniform integers in [0, num_range) shaped as dimensions_list, from AES-256-CTR keyed by SHA-256(seed)."""
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


def install() -> None:
    """Use `mask` for every SecAgg+ mask, in Flower's client mod and server workflow alike."""
    setattr(flower_mod, "pseudo_rand_gen", mask)  # noqa: B010 (a module mypy sees only as ModuleType)
    flower_workflow.pseudo_rand_gen = mask


def weight(cfg: FedshopConfig, num_examples: int) -> int:
    """What a merchant weighs its update by: its example count, or 1 under a DP preset (an unweighted mean)."""
    return 1 if cfg.privacy.name != "none" else num_examples


def _bridge(msg: Message, context: Context, call_next: ClientAppCallable, cfg: FedshopConfig) -> Message:
    """Legacy FitIns -> the train handler's content; its reply -> a legacy FitRes carrying the update."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=False)
    config: dict[str, Any] = dict(fitins.config)
    names = str(config.pop(NAMES_KEY)).split("\n")
    received = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in received.items()}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = reply.content.array_records["arrays"]
    metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
    update = [trained[k].numpy() - received[k] for k in names]
    metrics[CLIPPED_KEY] = int(sum(np.count_nonzero(np.abs(u) > cfg.secagg.clipping_range) for u in update))
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight(cfg, int(metrics["num-examples"])), metrics=metrics)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _pack(reply: Message) -> Message:
    """Masked vectors as uint32 rather than Flower's int64: half the upload, and the server's sums stay exact.

    Every masked value lies in [0, secagg.modulus_range), a power of 2 up to 2^32 (common/config.py); the
    server adds them with numpy, where uint32 wraps modulo 2^32, a multiple of the modulus, before it
    reduces them modulo the modulus.
    """
    if reply.has_error():
        return reply
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in configs:
        vectors = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.uint32)) for b in vectors]
    return reply


def secure_mod(config_of: Callable[[Context], FedshopConfig]) -> Callable[[Message, Context, ClientAppCallable],
                                                                        Message]:
    """A train mod: with secagg=plus, Flower's secaggplus_mod around the legacy bridge; else a pass-through."""

    def secure(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = config_of(context)
        if cfg.secagg.name == "none":
            return call_next(msg, context)
        reply = secaggplus_mod(msg, context, lambda m, c: _bridge(m, c, call_next, cfg))
        return _pack(reply)

    return secure


install()
