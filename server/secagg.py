"""SecAgg+ rounds: Flower's SecAggPlusWorkflow (legacy workflow API) driven by fedshop's round loop.

The workflow asks a legacy Strategy for FitIns (`configure_fit`) and hands it the unmasked aggregate
(`aggregate_fit`). `_Bridge` is that legacy Strategy, built over fedshop's Aggregator:
- configure_fit: the Aggregator's configure_train samples the merchants and builds their train messages (DP
  clipping norm, FedProx mu, ...); they become FitIns carrying the exchanged state and the array names;
- the merchants send masked *updates* (client/secure.py), weighted by wire.aggregation_weight;
- aggregate_fit: the workflow has unmasked the weighted mean update. Global state + mean update is handed
  to the Aggregator as every survivor's reply, so the chain (validation, the DP noise calibrated to the m
  survivors and the accountant, FedAvg/FedProx/FedAdam, metrics) runs unchanged on the one thing the
  server may see: the aggregate. Robust strategies and server-side clipping need individual updates and
  are refused with secagg=plus (common/run/config/).
The workflow itself is Flower's, with the early-dropout fix of server/flower_patches.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from common.protocol import wire
from common.run.config import FedshopConfig, SecAggConfig
from common.run.errors import FedshopError
from server.flower_patches import SecAggPlusWorkflow
from server.grid import MerchantGrid, payload_bytes
from server.report import Dropped, SecureStages, TrainReport, TrainResult
from server.strategy import Aggregator, Sent

log = logging.getLogger(__name__)


def _count(value: float) -> int | float:
    """A share count or threshold as Flower reads it: > 1 an integer count, else a fraction."""
    return int(value) if value > 1 else float(value)


@dataclass
class _Tap:
    """What each merchant sent and received in one SecAgg+ round, stage by stage, and why a merchant left."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)  # at the first stage a merchant failed

    def __call__(self, sent: list[Message], replies: list[Message], seconds: float) -> None:
        configs = [m.content.config_records.get(RECORD_KEY_CONFIGS) for m in sent]
        if not configs or configs[0] is None:  # not a SecAgg+ stage (e.g. the merchants' identification)
            return
        stage = str(configs[0][Key.STAGE])
        if stage == Stage.SETUP:
            self.protocol = {"num_shares": int(configs[0][Key.SHARE_NUMBER]),  # type: ignore[arg-type]
                             "threshold": int(configs[0][Key.THRESHOLD]),  # type: ignore[arg-type]
                             "max_weight": float(configs[0][Key.MAX_WEIGHT])}  # type: ignore[arg-type]
        for m in sent:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + payload_bytes(m.content)
        ok = [r for r in replies if not r.has_error()]
        for r in ok:
            node = r.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + payload_bytes(r.content)
        for r in replies:
            if r.has_error():
                self.reasons.setdefault(r.metadata.src_node_id, f"error in SecAgg+ stage '{stage}': {r.error.reason}")
        missing = {m.metadata.dst_node_id for m in sent} - {r.metadata.src_node_id for r in replies}
        for node in missing:
            self.reasons.setdefault(node, f"no reply in SecAgg+ stage '{stage}'")
        self.stages.append({"stage": stage, "sent": len(sent), "replied": len(ok), "seconds": round(seconds, 3)})


class _Bridge(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives, over fedshop's Aggregator."""

    def __init__(self, owner: SecureRound, arrays: ArrayRecord, config: ConfigRecord) -> None:
        self.owner, self.arrays, self.config = owner, arrays, config
        self.sent: Sent | None = None
        self.by_node: dict[int, Message] = {}
        self.clipped = 0
        self.result: TrainResult | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The chain's train messages as FitIns (exchanged state + config + array names); sets max_weight."""
        owner = self.owner
        self.sent = owner.aggregator.configure_train(server_round, self.arrays, self.config, owner.grid)
        self.by_node = {m.metadata.dst_node_id: m for m in self.sent.messages}
        sa = owner.cfg.secagg
        if len(self.by_node) * sa.quantization_range >= sa.modulus_range:
            raise FedshopError(f"secagg: {len(self.by_node)} merchants x secagg.quantization_range="
                               f"{sa.quantization_range} reaches secagg.modulus_range={sa.modulus_range}, so the "
                               "masked sum would overflow: lower the quantization range or sample fewer merchants")
        owner.workflow.max_weight = owner.max_weight(list(self.by_node))
        on_the_wire = self.sent.messages[0].content[wire.ARRAYS] if self.sent.messages else self.arrays
        model = compat.arrayrecord_to_parameters(on_the_wire, keep_input=True)  # type: ignore[arg-type]
        names = "\n".join(self.arrays.keys())
        # The workflow uses a proxy only for its node id.
        fitins = []
        for node, m in self.by_node.items():
            config: dict[str, Any] = {**m.content.config_records[wire.CONFIG], wire.ARRAY_NAMES: names}
            fitins.append((GridClientProxy(node, owner.grid, 0), FitIns(model, config)))
        return fitins  # type: ignore[return-value]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Global state + the unmasked mean update, as every survivor's reply, through the Aggregator."""
        if not results or self.sent is None:
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same mean
        model = ArrayRecord({k: Array((a.numpy() + u).astype(a.dtype))
                             for (k, a), u in zip(self.arrays.items(), mean_update, strict=True)})
        replies = []
        for proxy, res in results:
            metrics = dict(res.metrics)
            self.clipped += int(metrics.pop(wire.SECAGG_CLIPPED, 0))
            content = RecordDict({wire.ARRAYS: model, wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
            replies.append(Message(content, reply_to=self.by_node[int(proxy.cid)]))
        self.result = self.owner.aggregator.aggregate_train(self.sent, replies, secure=True)
        return None, {}  # the round loop takes self.result; the workflow keeps no model

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Not used by SecAggPlusWorkflow: the round loop holds the model."""
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Not used by SecAggPlusWorkflow: the round loop evaluates with Message-API messages."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        """Not used by SecAggPlusWorkflow."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Not used by SecAggPlusWorkflow: the round loop evaluates on the server."""
        return None


class SecureRound:
    """Runs one training round as SecAgg+ and reports what each merchant sent and received, stage by stage."""

    def __init__(self, cfg: FedshopConfig, grid: MerchantGrid, aggregator: Aggregator) -> None:
        sa: SecAggConfig = cfg.secagg
        self.cfg, self.grid, self.aggregator = cfg, grid, aggregator
        self.workflow = SecAggPlusWorkflow(_count(sa.num_shares), _count(sa.reconstruction_threshold),
                                           max_weight=1.0,  # set for every round in _Bridge.configure_fit
                                           clipping_range=sa.clipping_range,
                                           quantization_range=sa.quantization_range,
                                           modulus_range=sa.modulus_range, timeout=cfg.strategy.round_timeout)

    def max_weight(self, nodes: list[int]) -> float:
        """secagg.max_weight; else the largest weight among `nodes` (1 under DP, else a training-set size)."""
        if self.cfg.secagg.max_weight:
            return float(self.cfg.secagg.max_weight)
        sizes = [self.grid.sizes[n] for n in nodes if n in self.grid.sizes]
        if not sizes:
            raise FedshopError("secagg.max_weight: no sampled merchant reported its training-set size; set "
                               "secagg.max_weight to the largest example count a merchant may have")
        return float(max(wire.aggregation_weight(self.cfg.privacy.merchant_level, n) for n in sizes))

    def run(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> TrainResult:
        """One SecAgg+ training round: the aggregate (None when the protocol halted) and its report."""
        bridge, tap = _Bridge(self, arrays, config), _Tap()
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=bridge)
        self.grid.tap = tap
        try:
            self.workflow(self.grid, context)
        finally:
            self.grid.tap = None
        return self._result(server_round, bridge, tap)

    def _result(self, server_round: int, bridge: _Bridge, tap: _Tap) -> TrainResult:
        sampled = bridge.sent.nodes if bridge.sent is not None else []
        result = bridge.result
        if result is None:
            why = (f"SecAgg+ halted: a merchant kept fewer than the reconstruction threshold "
                   f"({tap.protocol.get('threshold')}) of live neighbours") if len(sampled) > 1 else (
                f"SecAgg+ needs at least 2 merchants in a round; {len(sampled)} sampled")
            log.warning("round %d: %s; the round's updates are lost", server_round, why)
            result = TrainResult(None, None, TrainReport(sampled, dropped=[Dropped(n, why) for n in sampled],
                                                         too_few_replies=True,
                                                         privacy=self.aggregator.privacy_spent()))
        report = result.report
        dropped = [replace(d, reason=tap.reasons.get(d.node, d.reason), bytes_up=tap.up.get(d.node, 0),
                           bytes_down=tap.down.get(d.node, 0)) for d in report.dropped]
        replied = [replace(r, bytes_up=tap.up.get(r.node, 0), bytes_down=tap.down.get(r.node, 0))
                   for r in report.replied]
        stages = SecureStages(tap.protocol, len(replied), bridge.clipped, tap.stages)
        if bridge.clipped:
            log.warning("round %d: %d update coordinates exceeded secagg.clipping_range=%g and were clipped "
                        "before quantisation", server_round, bridge.clipped, self.cfg.secagg.clipping_range)
        return replace(result, report=replace(report, replied=replied, dropped=dropped, secure_aggregation=stages,
                                              bytes_down_total=sum(tap.down.values()),
                                              bytes_up_total=sum(tap.up.values())))
