"""SecAgg+ on the merchant: Flower's secaggplus_mod around the train handler, bridged to the legacy format.

Flower's SecAgg+ lives in the older FitIns/FitRes API: secaggplus_mod hands the training stage on in the
legacy layout and quantises and masks the parameters of the FitRes it gets back. The bridge turns that
FitIns into the train instruction the handler reads, and the handler's reply into a FitRes whose parameters
are the *update* (trained - received) rather than the model: an update is small, so quantising it over
[-secagg.clipping_range, +secagg.clipping_range] loses far less than quantising the weights over Flower's
[-8, 8]. The server adds the securely averaged update to the global model. The masks themselves come from
the whole shared secret (patch 2 in client/flower_patches.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
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

from common.protocol import wire
from common.run.config import FedshopConfig
from common.run.errors import FedshopError


def _bridge(msg: Message, context: Context, call_next: ClientAppCallable, cfg: FedshopConfig) -> Message:
    """Legacy FitIns -> the train handler's instruction; its reply -> a legacy FitRes carrying the update."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=False)
    config: dict[str, Any] = dict(fitins.config)
    names = str(config.pop(wire.ARRAY_NAMES)).split("\n")
    received = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    msg.content = RecordDict({wire.ARRAYS: wire.to_arrays(received), wire.CONFIG: ConfigRecord(config)})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if (declined := wire.Declined.from_content(reply.content)) is not None:
        # SecAgg+ has no way to say "no update": the merchant leaves the round, which the protocol survives
        # as a dropout (its masks are rebuilt from the shares of the others).
        raise FedshopError(f"declined: {declined.reason}")
    trained = wire.TrainReply.from_content(reply.content)
    update = [trained.arrays[k].numpy() - received[k] for k in names]
    clipped = int(sum(np.count_nonzero(np.abs(u) > cfg.secagg.clipping_range) for u in update))
    metrics: dict[str, Any] = {**trained.to_content().metric_records[wire.METRICS], wire.SECAGG_CLIPPED: clipped}
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=wire.aggregation_weight(cfg.privacy.merchant_level, trained.num_examples),
                    metrics=metrics)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _pack(reply: Message) -> Message:
    """Masked vectors as uint32 rather than Flower's int64: half the upload, and the server's sums stay exact.

    Every masked value lies in [0, secagg.modulus_range), a power of 2 up to 2^32 (common/run/config/); the
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
