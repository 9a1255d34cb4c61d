"""SecAgg+ rounds: Flower's SecAggPlusWorkflow (legacy workflow API) driven by fedshop's round loop.

The workflow asks a legacy Strategy for FitIns (`configure_fit`) and hands it the unmasked aggregate
(`aggregate_fit`). `_Bridge` is that legacy Strategy, built over fedshop's Message-API strategy chain:
- configure_fit: the chain's configure_train samples the merchants and builds their train messages (DP
  clipping norm, FedProx mu, ...); they become FitIns carrying the global model and the array names;
- the merchants send masked *updates* (client/secure.py), weighted by example count, or by 1 under DP;
- aggregate_fit: the workflow has unmasked the weighted mean update. Global model + mean update is handed
  to the chain as every survivor's reply, so the chain (validation, the DP noise calibrated to the m
  survivors and the accountant, FedAvg/FedProx/FedAdam, metrics) runs unchanged on the one thing the
  server may see: the aggregate. Robust strategies and server-side clipping need individual updates and
  are refused with secagg=plus (common/config.py).
"""

from __future__ import annotations

import logging
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
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from client.secure import CLIPPED_KEY, NAMES_KEY, weight
from common.config import FedshopConfig, SecAggConfig
from common.errors import FedshopError
from server.grid import MerchantGrid, payload_bytes
from server.strategy import RecordingStrategy

log = logging.getLogger(__name__)
FLOWER_MAX_WEIGHT = 1000  # SecAggPlusWorkflow's default, used when no merchant reported its size


def _count(value: float) -> int | float:
    """A share count or threshold as Flower reads it: > 1 an integer count, else a fraction."""
    return int(value) if value > 1 else float(value)


class _Bridge(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives, over fedshop's Message-API strategy chain."""

    def __init__(self, owner: SecureRound, arrays: ArrayRecord, config: ConfigRecord) -> None:
        self.owner, self.arrays, self.config = owner, arrays, config
        self.sent: dict[int, Message] = {}
        self.clipped = 0
        self.result: tuple[ArrayRecord | None, MetricRecord | None] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The chain's train messages as FitIns (model + config + array names); sets the round's max_weight."""
        owner = self.owner
        messages = list(owner.strategy.configure_train(server_round, self.arrays, self.config, owner.grid))
        self.sent = {m.metadata.dst_node_id: m for m in messages}
        sa = owner.cfg.secagg
        if len(self.sent) * sa.quantization_range >= sa.modulus_range:
            raise FedshopError(f"secagg: {len(self.sent)} merchants x secagg.quantization_range="
                               f"{sa.quantization_range} reaches secagg.modulus_range={sa.modulus_range}, so the "
                               "masked sum would overflow: lower the quantization range or sample fewer merchants")
        owner.workflow.max_weight = owner.max_weight(list(self.sent))
        model = compat.arrayrecord_to_parameters(self.arrays, keep_input=True)
        names = "\n".join(self.arrays.keys())
        # The workflow uses a proxy only for its node id.
        fitins = []
        for node, m in self.sent.items():
            config: dict[str, Any] = {**m.content.config_records["config"], NAMES_KEY: names}
            fitins.append((GridClientProxy(node, owner.grid, 0), FitIns(model, config)))
        return fitins  # type: ignore[return-value]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Global model + the unmasked mean update, as every survivor's reply, through the strategy chain."""
        if not results:
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same mean
        metrics = [dict(res.metrics) for _, res in results]
        self.clipped = sum(int(m.pop(CLIPPED_KEY, 0)) for m in metrics)  # type: ignore[call-overload]
        model = ArrayRecord({k: Array((a.numpy() + u).astype(a.dtype))
                             for (k, a), u in zip(self.arrays.items(), mean_update, strict=True)})
        replies = [Message(RecordDict({"arrays": model, "metrics": MetricRecord(m)}),  # type: ignore[arg-type]
                           reply_to=self.sent[int(proxy.cid)]) for (proxy, _), m in zip(results, metrics, strict=True)]
        self.result = self.owner.strategy.aggregate_train(server_round, replies)
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


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow, where a merchant lost before its key shares reached its neighbours leaves the
    round instead of breaking it.

    Flower counts every merchant that fails to answer as "dead" for the unmask stage, so it asks the others
    for their shares of a merchant lost at setup or key sharing, which they never received: a KeyError on
    every merchant, and the round is lost. Such a merchant masked nothing and was masked by nobody, so here
    it is dropped from the round's sample and from every neighbourhood at the end of those two stages.
    """

    _early = True  # inside the setup or key-sharing stage

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage; merchants that sent no public keys leave the round."""
        self._early = True
        return super().setup_stage(grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's key-sharing stage; merchants that sent no encrypted shares leave the round."""
        self._early = True
        return super().share_keys_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's stage; from here a lost merchant's masks are rebuilt from its neighbours' shares."""
        self._early = False
        return super().collect_masked_vectors_stage(grid, context, state)

    def _check_threshold(self, state: WorkflowState) -> bool:
        if self._early and state.nid_to_neighbours:
            keep = set(state.active_node_ids)
            state.sampled_node_ids = set(keep)
            state.nid_to_neighbours = {n: peers & keep for n, peers in state.nid_to_neighbours.items() if n in keep}
        return bool(super()._check_threshold(state))


class SecureRound:
    """Runs one training round as SecAgg+ and records what each merchant sent and received, stage by stage."""

    def __init__(self, cfg: FedshopConfig, grid: MerchantGrid, strategy: RecordingStrategy) -> None:
        sa: SecAggConfig = cfg.secagg
        self.cfg, self.grid, self.strategy = cfg, grid, strategy
        self.workflow = _SecAggPlus(_count(sa.num_shares), _count(sa.reconstruction_threshold),
                                           max_weight=sa.max_weight or FLOWER_MAX_WEIGHT,
                                           clipping_range=sa.clipping_range,
                                           quantization_range=sa.quantization_range,
                                           modulus_range=sa.modulus_range, timeout=cfg.strategy.round_timeout)
        self.stages: list[dict[str, Any]] = []
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.protocol: dict[str, Any] = {}
        self.reasons: dict[int, str] = {}  # why a merchant left the round, at the first stage it failed

    def max_weight(self, nodes: list[int]) -> float:
        """secagg.max_weight; else the largest weight among `nodes` (1 under DP, else a training-set size)."""
        if self.cfg.secagg.max_weight:
            return float(self.cfg.secagg.max_weight)
        sizes = [self.grid.sizes[n] for n in nodes if n in self.grid.sizes] or [FLOWER_MAX_WEIGHT]
        return float(max(weight(self.cfg, n) for n in sizes))

    def _tap(self, sent: list[Message], replies: list[Message], seconds: float) -> None:
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

    def run(self, server_round: int, arrays: ArrayRecord,
            config: ConfigRecord) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One SecAgg+ training round; the aggregate (None when the protocol halted) and the train metrics."""
        self.stages, self.down, self.up, self.protocol, self.reasons = [], {}, {}, {}, {}
        bridge = _Bridge(self, arrays, config)
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=bridge)
        self.grid.tap = self._tap
        try:
            self.workflow(self.grid, context)
        finally:
            self.grid.tap = None
        result = bridge.result or (None, None)
        self._record(server_round, bridge, halted=bridge.result is None)
        return result

    def _record(self, server_round: int, bridge: _Bridge, halted: bool) -> None:
        rec = self.strategy.record
        reasons = self.reasons
        if halted:
            rec["too_few_replies"] = True
            rec["replied"] = []
            why = (f"SecAgg+ halted: a merchant kept fewer than the reconstruction threshold "
                   f"({self.protocol.get('threshold')}) of live neighbours") if len(bridge.sent) > 1 else (
                f"SecAgg+ needs at least 2 merchants in a round; {len(bridge.sent)} sampled")
            rec["dropped"] = [{"node": n, "reason": reasons.get(n, why)} for n in bridge.sent]
            log.warning("round %d: %s; the round's updates are lost", server_round, why)
        for entry in rec["dropped"]:
            entry["reason"] = reasons.get(entry["node"], entry["reason"])
        for entry in rec["replied"] + rec["dropped"]:
            entry["bytes_up"], entry["bytes_down"] = self.up.get(entry["node"], 0), self.down.get(entry["node"], 0)
        rec["bytes_down_total"], rec["bytes_up_total"] = sum(self.down.values()), sum(self.up.values())
        rec["secure_aggregation"] = {**self.protocol, "survivors": len(rec["replied"]),
                                     "clipped_values": bridge.clipped, "stages": self.stages}
        if bridge.clipped:
            log.warning("round %d: %d update coordinates exceeded secagg.clipping_range=%g and were clipped "
                        "before quantisation", server_round, bridge.clipped, self.cfg.secagg.clipping_range)
