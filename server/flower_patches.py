"""Every change fedshop makes to Flower on the server side, in one place.

Written for flwr 1.39: each patch calls `require()` and refuses another release loudly, and each has a canary
test (tests/test_flower_patches.py) that fails the day upstream changes the behaviour it works around, so it
can be dropped. The module swaps are applied by the entry point (`apply()`, called by the round loop in
server/federation.py); importing this module changes nothing.

1. zero_safe_clipping: Flower's DP clipping divides by the update's norm, so an update of exactly zero (a
   merchant whose training did not move the model) raises ZeroDivisionError and loses the round.
2. whole_secret_masks: Flower's SecAgg+ seeds every mask with a 32-bit fold of its 256-bit shared secret, so
   a server could search 2^32 seeds for a merchant's private mask; masks come from AES-256-CTR instead.
3. SecAggPlusWorkflow (overrides the private `_check_threshold`): Flower loses the whole round when a merchant
   is lost at setup or key sharing.
4. AdaptiveNoiseFix (overrides the private `_add_noise_to_aggregated_arrays`): Flower's adaptive clipping
   noises the mean with the next round's clipping norm instead of the one the updates were clipped to.
5. server_opt_state / load_server_opt_state: the server optimisers' state (FedAdam's, FedYogi's and FedAdagrad's
   moments `m_t` / `v_t`, FedAvgM's `momentum_vector`) is not part of any Flower API, but a resume must restore it.
6. record_simulated_nodes: in a simulation the ServerApp cannot see which partition (merchant) each node id
   stands for, so it would have to ask every node with a message: 10,000 messages before round 1 with
   10,000 virtual merchants. The simulation engine's node registration is wrapped to keep its mapping.
"""

from __future__ import annotations

from typing import Any

import flwr.server.superlink.fleet.vce.vce_api as flower_vce
import flwr.serverapp.strategy.dp_adaptive_clipping as flower_adaptive
import flwr.supercore.differential_privacy as flower_dp
import numpy as np
from flwr.app import ArrayRecord
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow as FlowerSecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

from common.protocol import flower_version, privacy_math

# Flower's originals, kept for the canary tests (captured, not changed, on import).
FLOWER_CLIP = flower_dp.clip_inputs_inplace
FLOWER_ADAPTIVE_CLIP = flower_dp.adaptive_clip_inputs_inplace
FLOWER_WORKFLOW_MASKS = flower_workflow.pseudo_rand_gen
FLOWER_REGISTER_NODES = flower_vce._register_nodes


def require(patch: str) -> None:
    """Refuse to patch a Flower release the patch was not written for."""
    flower_version.require(patch, "server/flower_patches.py")


def apply() -> None:
    """Install the module-level patches (1, 2); idempotent."""
    require("zero_safe_clipping")
    flower_dp.clip_inputs_inplace = privacy_math.clip_inputs_inplace
    # The adaptive wrapper imported its own reference to the helper.
    for module in (flower_dp, flower_adaptive):
        module.adaptive_clip_inputs_inplace = privacy_math.adaptive_clip_inputs_inplace  # type: ignore[attr-defined]
    require("whole_secret_masks")
    flower_workflow.pseudo_rand_gen = privacy_math.mask


def record_simulated_nodes() -> dict[int, int]:
    """Patch 6, for a simulation in this process: the live node id -> partition id mapping of Flower's
    simulation engine, filled when it registers its nodes."""
    require("record_simulated_nodes")
    nodes: dict[int, int] = {}

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping: dict[int, int] = FLOWER_REGISTER_NODES(num_nodes, state_factory)
        nodes.update(mapping)
        return mapping

    flower_vce._register_nodes = register
    return nodes


class SecAggPlusWorkflow(FlowerSecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow, where a merchant lost before its key shares reached its neighbours leaves the
    round instead of breaking it.

    Flower counts every merchant that fails to answer as "dead" for the unmask stage, so it asks the others
    for their shares of a merchant lost at setup or key sharing, which they never received: a KeyError on
    every merchant, and the round is lost. Such a merchant masked nothing and was masked by nobody, so here
    it is dropped from the round's sample and from every neighbourhood at the end of those two stages.
    """

    _early = True  # inside the setup or key-sharing stage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require("SecAggPlusWorkflow early dropouts")
        super().__init__(*args, **kwargs)

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


class AdaptiveNoiseFix:
    """Mixin for Flower's DifferentialPrivacyServerSideAdaptiveClipping: the noise uses the C the updates were
    clipped to (Flower 1.39 updates C before it noises the aggregate)."""

    clipping_norm: float
    _clip_used = 0.0

    def remember_clipping_norm(self) -> None:
        """Call before aggregating: the C this round's updates are clipped to."""
        require("AdaptiveNoiseFix")
        self._clip_used = self.clipping_norm

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self._clip_used
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]
        finally:
            self.clipping_norm = updated


def server_opt_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    """The server optimiser's state: FedOpt's (FedAdam, FedYogi, FedAdagrad) moments by array name, FedAvgM's
    momentum by position ({} for another strategy, or before its first round)."""
    if isinstance(strategy, FedOpt):
        require("server_opt_state")
        return {key: {k: np.ascontiguousarray(v) for k, v in getattr(strategy, key).items()}
                for key in ("m_t", "v_t") if getattr(strategy, key, None)}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        require("server_opt_state")
        return {"momentum_vector": {str(i): np.ascontiguousarray(v) for i, v in enumerate(strategy.momentum_vector)}}
    return {}


def load_server_opt_state(strategy: Any, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Inverse of server_opt_state."""
    if state:
        require("server_opt_state")
    for key, value in state.items():
        if key == "momentum_vector":
            strategy.momentum_vector = [np.asarray(value[str(i)]) for i in range(len(value))]
        else:
            setattr(strategy, key, {k: np.asarray(v) for k, v in value.items()})
