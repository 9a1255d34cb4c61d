"""SecAgg+: the real Flower workflow and client mod with fedshop's bridges, run in process over a grid that
delivers each message to a real ClientApp (tiny model, real training), with merchants that drop out."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks
from flwr.serverapp import Grid

from client.client_app import build_client_app
from common.protocol import wire
from common.protocol.privacy_math import mask
from common.run.config import FedshopConfig, compose
from common.tasks import data as D
from common.tasks import exchange
from common.tasks import model as M
from server import flower_patches
from server.grid import MerchantGrid
from server.privacy import make_private
from server.report import TrainResult
from server.secagg import SecureRound
from server.strategy import build_strategy
from tests.conftest import TINY_REVIEWS
from tests.test_strategy import aggregator

K = 4
NODES = [101, 102, 103, 104]  # node ids; merchant i runs on NODES[i]


class LocalGrid(Grid):
    """Delivers every message to a real ClientApp at once (one Context per node, as a SuperNode keeps it).

    `die` maps a node to the SecAgg+ stage from which on it never replies, as a merchant whose process died.
    Every merchant's masked upload is kept in `uploads`.
    """

    def __init__(self, cfg: FedshopConfig) -> None:
        self.app = build_client_app(cfg)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": K},
                                    state=RecordDict(), run_config={}) for i, n in enumerate(NODES)}
        self.die: dict[int, str] = {}
        self.dead: set[int] = set()
        self.queue: dict[str, Message] = {}
        self.uploads: dict[int, list[bytes]] = {}
        self.count = 0

    def set_run(self, run: Any) -> None:
        """Unused."""

    @property
    def run(self) -> Any:
        """Unused."""
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Unused."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = str(self.count)
            ids.append(str(self.count))
            node = msg.metadata.dst_node_id
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and self.die.get(node) == str(configs[Key.STAGE]):
                self.dead.add(node)
            if node not in self.dead:
                # A copy, as the wire gives one: the merchant must not share objects with the server.
                delivered = Message(content=copy.deepcopy(msg.content), dst_node_id=node,
                                    message_type=msg.metadata.message_type)
                delivered.metadata.__dict__["_message_id"] = str(self.count)
                self.queue[str(self.count)] = delivered
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The merchants handle their messages when the server first asks for the replies."""
        replies = []
        for i in [i for i in message_ids if i in self.queue]:
            msg = self.queue.pop(i)
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - as Flower does: a failed ClientApp answers with an error
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
            if reply.has_error():
                continue
            out = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if out is not None and Key.MASKED_PARAMETERS in out:
                self.uploads[node] = list(out[Key.MASKED_PARAMETERS])  # type: ignore[arg-type]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Unused: MerchantGrid drives push and pull."""
        raise NotImplementedError


def config(*more: str) -> FedshopConfig:
    return compose(["task=relevance",
                    *TINY_REVIEWS, "train.local_epochs=1", f"simulation.num_merchants={K}", "secagg=plus",
                    "strategy.round_timeout=1", *more])


def one_round(cfg: FedshopConfig, die: dict[int, str] | None = None,
              workflow: type | None = None) -> tuple[dict[str, np.ndarray] | None, TrainResult, LocalGrid, dict]:
    """One SecAgg+ training round from the initial model: (aggregate or None, result, LocalGrid, global)."""
    flower_patches.apply()
    labels = D.prepare(cfg).labels
    model = M.build_model(cfg.model, labels, cfg.seed, cfg.finetune)
    weights = exchange.extract(model)
    local = LocalGrid(cfg)
    local.die = dict(die or {})
    grid = MerchantGrid(local, cfg.strategy.round_timeout, 0.01, exchange.fingerprint(model))
    chain = aggregator(make_private(build_strategy(cfg.strategy), cfg.privacy, cfg.strategy, K),
                            wire.spec(weights), private=cfg.privacy.name != "none")
    secure = SecureRound(cfg, grid, chain)
    if workflow is not None:  # Flower's own workflow, for the canary test
        secure.workflow = workflow(**{k: getattr(secure.workflow, k) for k in WORKFLOW_ARGS})
    result = secure.run(1, wire.to_arrays(weights), ConfigRecord())
    return (None if result.arrays is None else wire.from_arrays(result.arrays)), result, local, weights


WORKFLOW_ARGS = ("num_shares", "reconstruction_threshold", "max_weight", "clipping_range", "quantization_range",
                 "modulus_range", "timeout")


def trained_updates(cfg: FedshopConfig) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, int]]:
    """Each merchant's own update and example count from a plain round (what SecAgg+ hides from the server)."""
    local = LocalGrid(cfg)
    labels = D.prepare(cfg).labels
    weights = exchange.extract(M.build_model(cfg.model, labels, cfg.seed, cfg.finetune))
    updates, sizes = {}, {}
    for i, node in enumerate(NODES):
        msg = Message(content=wire.Instruction(wire.to_arrays(weights), 1).to_content(), dst_node_id=node,
                      message_type=wire.TRAIN)
        reply = local.app(msg, Context(run_id=1, node_id=node, node_config={"partition-id": i,
                                                                           "num-partitions": K},
                                       state=RecordDict(), run_config={}))
        trained = wire.TrainReply.from_content(wire.unpack(reply.content))  # as the server's grid does
        updates[node] = {k: trained.arrays[k].numpy().astype(np.float64) - weights[k] for k in weights}
        sizes[node] = trained.num_examples
    return updates, sizes


def mean_update(updates: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = sum(weights.values())
    keys = next(iter(updates.values()))
    return {k: np.sum([weights[n] * updates[n][k] for n in weights], axis=0) / total for k in keys}


def quantisation_bound(cfg: FedshopConfig, weights: dict[int, float], max_weight: float) -> float:
    """|SecAgg+ mean - exact mean| per coordinate: every merchant's stochastic rounding is off by < one step
    of 2R/T, and the sum of m of them is divided by the total quantised weight sum(q_i)/T."""
    sa = cfg.secagg
    q_total = sum(round(w / max_weight * sa.quantization_range) for w in weights.values())
    return 2 * sa.clipping_range * len(weights) / q_total


@pytest.fixture(scope="module")
def plain_updates():
    return trained_updates(config("secagg=none"))


def test_masks_use_the_whole_secret():
    """Flower folds a 32-byte secret to a 32-bit numpy seed, so secrets with the same fold give the same mask;
    fedshop's masks (AES-256-CTR keyed by the whole secret) differ, stay in range and look uniform."""
    a = hashlib.sha256(b"a").digest()
    b = a[4:8] + a[:4] + a[8:]  # the same words, reordered: the same XOR fold
    shapes = [(1000, 50), (7,), ()]
    assert all(np.array_equal(x, y) for x, y in zip(flower_masks(a, 1 << 32, shapes),
                                                    flower_masks(b, 1 << 32, shapes), strict=True))
    ma, mb = mask(a, 1 << 32, shapes), mask(b, 1 << 32, shapes)
    assert [m.shape for m in ma] == shapes and all(m.dtype == np.int64 for m in ma)
    assert not np.array_equal(ma[0], mb[0])
    assert all(np.array_equal(x, y) for x, y in zip(ma, mask(a, 1 << 32, shapes), strict=True))  # deterministic
    assert ma[0].min() >= 0 and ma[0].max() < 1 << 32
    assert ma[0].mean() == pytest.approx(2**31, rel=0.01)
    small = mask(a, 1 << 10, [(100_000,)])[0]
    assert small.min() == 0 and small.max() == 1023
    with pytest.raises(ValueError, match="power of 2"):
        mask(a, 1000, shapes)


def test_secure_mean_equals_fedavg_within_quantisation_error(plain_updates):
    cfg = config()
    agg, result, local, start = one_round(cfg)
    updates, sizes = plain_updates
    assert agg is not None
    exact = mean_update(updates, {n: float(s) for n, s in sizes.items()})  # weighted FedAvg: sum n_k/N theta_k
    bound = quantisation_bound(cfg, {n: float(s) for n, s in sizes.items()}, max(sizes.values()))
    err = max(float(np.abs(agg[k].astype(np.float64) - start[k] - exact[k]).max()) for k in agg)
    slack = max(float(np.abs(v).max()) for v in start.values()) * 2 ** -23  # float32 rounding of the model
    assert 0 < err <= bound + slack, (err, bound)
    rec = result.report
    assert sorted(x.node for x in rec.replied) == NODES and rec.dropped == []
    assert all(x.update_norm is None for x in rec.replied)  # the server saw no single update
    assert rec.secure_aggregation is not None
    summary = rec.secure_aggregation.as_json()
    assert summary["survivors"] == K and summary["threshold"] == 2 and summary["max_weight"] == max(sizes.values())
    assert [s["stage"] for s in summary["stages"]] == [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS,
                                                       Stage.UNMASK]
    # What one merchant uploads is its quantised update (values in [0, 2^22]) plus masks: uniform on [0, 2^32).
    for node, vectors in local.uploads.items():
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in vectors])
        assert values.dtype == np.uint32
        assert np.mean(values > cfg.secagg.quantization_range) > 0.99
        assert values.mean() == pytest.approx(2**31, rel=0.01)
        entry = next(x for x in rec.replied if x.node == node)
        assert entry.bytes_up == pytest.approx(4 * values.size, rel=0.01)


def test_merchants_may_drop_out_down_to_the_reconstruction_threshold(plain_updates):
    """4 merchants, threshold 2: two that die after sharing their keys (before uploading) are unmasked from
    their neighbours' shares and the mean covers the two survivors; a third death halts the round."""
    cfg = config()
    updates, sizes = plain_updates
    agg, result, _, start = one_round(cfg, die={NODES[1]: Stage.COLLECT_MASKED_VECTORS,
                                                  NODES[3]: Stage.COLLECT_MASKED_VECTORS})
    survivors = {NODES[0]: float(sizes[NODES[0]]), NODES[2]: float(sizes[NODES[2]])}
    exact = mean_update(updates, survivors)
    assert agg is not None
    err = max(float(np.abs(agg[k].astype(np.float64) - start[k] - exact[k]).max()) for k in agg)
    assert err <= quantisation_bound(cfg, survivors, max(sizes.values())) + 1e-6
    rec = result.report
    assert sorted(x.node for x in rec.replied) == [NODES[0], NODES[2]]
    assert {d.node: d.reason for d in rec.dropped} == {
        n: "no reply in SecAgg+ stage 'collect_masked_vectors'" for n in (NODES[1], NODES[3])}
    assert rec.secure_aggregation is not None and rec.secure_aggregation.survivors == 2 and not rec.too_few_replies

    agg, result, _, _ = one_round(cfg, die={n: Stage.COLLECT_MASKED_VECTORS for n in NODES[1:]})
    assert agg is None and result.report.too_few_replies
    assert result.report.replied == [] and len(result.report.dropped) == K


@pytest.mark.parametrize("early", [Stage.SETUP, Stage.SHARE_KEYS])
def test_a_merchant_lost_before_its_shares_arrive_leaves_the_round(plain_updates, early):
    """Flower's workflow asks the survivors for shares of such a merchant, which they never got (KeyError on
    every merchant: the round was lost). fedshop drops it from the round; a merchant lost later in the same
    round is still unmasked from its neighbours' shares."""
    cfg = config()
    updates, sizes = plain_updates
    agg, result, _, start = one_round(cfg, die={NODES[0]: early, NODES[3]: Stage.COLLECT_MASKED_VECTORS})
    survivors = {NODES[1]: float(sizes[NODES[1]]), NODES[2]: float(sizes[NODES[2]])}
    assert agg is not None, result.report.dropped
    exact = mean_update(updates, survivors)
    err = max(float(np.abs(agg[k].astype(np.float64) - start[k] - exact[k]).max()) for k in agg)
    assert err <= quantisation_bound(cfg, survivors, max(sizes.values())) + 1e-6
    reasons = {d.node: d.reason for d in result.report.dropped}
    assert reasons == {NODES[0]: f"no reply in SecAgg+ stage '{early}'",
                       NODES[3]: "no reply in SecAgg+ stage 'collect_masked_vectors'"}


def test_secure_aggregation_with_client_clipping_and_server_noise(plain_updates):
    """privacy=client + secagg: merchants clip, SecAgg+ sums unweighted, the server noises the mean it
    unmasked with N(0, (zC/m)^2) and accounts one release."""
    clip, z = 0.05, 0.8
    updates, _ = plain_updates
    quiet, result, _, start = one_round(config("privacy=client", f"privacy.clipping_norm={clip}",
                                                 "privacy.noise_multiplier=1e-9"))
    assert quiet is not None
    assert result.report.secure_aggregation is not None
    assert result.report.secure_aggregation.protocol["max_weight"] == 1.0  # unweighted
    clipped = {n: {k: v * min(1.0, clip / np.sqrt(sum(float(np.sum(x * x)) for x in u.values())))
                   for k, v in u.items()} for n, u in updates.items()}
    exact = mean_update(clipped, {n: 1.0 for n in NODES})
    err = max(float(np.abs(quiet[k].astype(np.float64) - start[k] - exact[k]).max()) for k in quiet)
    assert err < 1e-5
    norm = np.sqrt(sum(float(np.sum((quiet[k].astype(np.float64) - start[k]) ** 2)) for k in quiet))
    assert norm <= clip * (1 + 1e-3)
    noisy, result, _, _ = one_round(config("privacy=client", f"privacy.clipping_norm={clip}",
                                             f"privacy.noise_multiplier={z}"))
    assert noisy is not None
    noise = np.concatenate([(noisy[k].astype(np.float64) - quiet[k]).ravel() for k in noisy])
    assert noise.std() == pytest.approx(z * clip / K, rel=0.02)
    spent = result.report.privacy
    assert spent is not None and spent["releases"] == 1 and spent["epsilon"] > 0


@pytest.mark.parametrize("more", [["privacy=local"], ["strategy=fedprox", "strategy.proximal_mu=0.1"],
                                  ["strategy=fedadam"]])
def test_other_presets_and_strategies_aggregate_securely(more):
    """privacy=local (each masked update already noised; accounted per merchant release), FedProx and FedAdam
    (applied to the securely averaged update) run through the same bridge."""
    agg, result, _, start = one_round(config(*more))
    assert agg is not None and result.report.secure_aggregation is not None
    assert result.report.secure_aggregation.survivors == K
    assert any(not np.array_equal(agg[k], start[k]) for k in agg)
    if "privacy=local" in more:
        spent = result.report.privacy
        assert spent is not None and spent["releases"] == 1 and spent["sampling"] == "local"


def test_a_round_whose_masked_sum_could_overflow_is_refused():
    from common.run.errors import FedshopError

    with pytest.raises(FedshopError, match="masked sum would overflow"):
        one_round(config(f"secagg.quantization_range={2**30}"))  # 4 merchants x 2^30 = 2^32


def test_secagg_refuses_what_needs_single_updates():
    from common.run.errors import FedshopError

    for bad, field in ((["strategy=krum"], "strategy.name"), (["privacy=central"], "privacy.name"),
                       (["strategy.max_update_norm=1.0"], "strategy.max_update_norm"),
                       (["secagg.num_shares=2"], "secagg.num_shares"),
                       (["secagg.modulus_range=1000"], "secagg.modulus_range")):
        with pytest.raises(FedshopError, match=f"config {field}="):
            config(*bad)


def test_merchants_refuse_a_server_with_another_base():
    """A merchant whose frozen base hashes differently refuses the server's query, naming both fingerprints;
    the grid records the refusal (server/federation.py then stops the run)."""
    cfg = config("secagg=none", "finetune=lora")
    grid = MerchantGrid(LocalGrid(cfg), 1.0, 0.01, "0123456789abcdef")
    assert list(grid.get_node_ids()) and grid.index == {}
    assert set(grid.refused) == set(NODES)
    reason = grid.refused[NODES[0]]
    assert "merchant_00: base model fingerprint " in reason and "differs from the server's 0123456789abcdef" in reason


def test_replies_are_pulled_soon_then_every_poll_interval(monkeypatch):
    """The server's pull loop waits 10 ms first and doubles up to poll_interval: replies that come back at once
    (SecAgg+'s key stages) are not held for a whole interval, and a long wait still polls at poll_interval."""
    from types import SimpleNamespace

    import server.grid as G

    class Slow:
        """A grid whose replies exist from the `ready`-th pull on."""

        def __init__(self, ready: int) -> None:
            self.ready, self.pulls = ready, 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls < self.ready:
                return []
            return [bare(SimpleNamespace(reply_to_message_id=i)) for i in ids]

    def bare(metadata: SimpleNamespace | None = None) -> SimpleNamespace:
        """A message with nothing to pack or unpack."""
        return SimpleNamespace(metadata=metadata, content=RecordDict(), has_error=lambda: False)

    waits: list[float] = []
    monkeypatch.setattr(G.time, "sleep", waits.append)
    for ready, expected in ((1, []), (2, [0.01]), (8, [0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2])):
        waits.clear()
        grid = MerchantGrid(Slow(ready), 5.0, 0.2, "0123456789abcdef")  # type: ignore[arg-type]
        assert len(list(grid.send_and_receive([bare(), bare()]))) == 2  # type: ignore[list-item]
        assert waits == pytest.approx(expected)
