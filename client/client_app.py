"""Flower ClientApp: a merchant fine-tunes the global model on its private shard (thin glue over common/)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from client import flower_patches
from client.secure import secure_mod
from common.protocol import attacks, wire
from common.protocol.merchant_state import MerchantState, RecordBudget
from common.run import logs
from common.run.config import FedshopConfig, from_run_config
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks import dp, exchange
from common.tasks.base import Task, Workbench, train_seed
from common.tasks.registry import get_task

log = logging.getLogger(__name__)


@dataclass
class Merchant:
    """This node's merchant: who it is, its tokenised shard and the task's (shared) workbench it trains."""

    index: int
    name: str
    wb: Workbench
    base_fingerprint: str  # of the frozen part of the model (common/tasks/exchange.py)
    train: datasets.Dataset
    val: datasets.Dataset

    @property
    def task(self) -> Task:
        """The run's task."""
        return self.wb.task

    def check_base(self, requested: str | None) -> None:
        """Refuse to work on another frozen base than the server's."""
        if requested is not None and requested != self.base_fingerprint:
            message = (f"{self.name}: {wire.BASE_MISMATCH} {self.base_fingerprint} differs from the server's "
                       f"{requested}: model, finetune and labels must be the same on every merchant")
            log.error("%s", message)
            raise FedshopError(message)


@dataclass
class _Shard:
    index: int
    name: str
    train: datasets.Dataset
    val: datasets.Dataset
    labels: list[str]


# Caches that only save work: one model skeleton per process (every message overwrites its exchanged state)
# and the tokenised shards of the merchants this process served last (a simulation actor serves many virtual
# merchants). What a merchant must remember between rounds lives in Context.state (common/protocol/merchant_state.py).
_MODELS: dict[str, tuple[Workbench, str]] = {}
_SHARDS: OrderedDict[str, _Shard] = OrderedDict()
MAX_CACHED_SHARDS = 64


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _read_shard(cfg: FedshopConfig, node_config: dict[str, Any]) -> tuple[int, str, datasets.Dataset,
                                                                          datasets.Dataset, list[str]]:
    """(index, name, train, val, labels) of this node: its own shard file, or a partition in simulation."""
    if node_config.get(wire.NODE_SHARD):
        if wire.NODE_MERCHANT_INDEX not in node_config:
            raise FedshopError(f"node config has '{wire.NODE_SHARD}' but no '{wire.NODE_MERCHANT_INDEX}'")
        index = int(node_config[wire.NODE_MERCHANT_INDEX])
        name = str(node_config.get(wire.NODE_MERCHANT_NAME) or f"merchant_{index:02d}")
        train, val, labels = D.load_shard(str(node_config[wire.NODE_SHARD]), cfg, name)
        return index, name, train, val, labels
    fd = D.prepare(cfg)
    index = int(node_config[wire.NODE_PARTITION_ID])
    return index, fd.names[index], fd.train[index], fd.val[index], fd.labels


def load_merchant(cfg: FedshopConfig, node_config: dict[str, Any]) -> Merchant:
    """This node's merchant, its shard tokenised once and cached; the base model from this node's own copy
    when its node config names one (deploy.model_path)."""
    if node_config.get(wire.NODE_MODEL_PATH):
        cfg = replace(cfg, model=replace(cfg.model, path=str(node_config[wire.NODE_MODEL_PATH])))
    model_key = _digest({"model": asdict(cfg.model), "finetune": asdict(cfg.finetune), "data": asdict(cfg.data),
                         "seed": cfg.seed})
    key = _digest({"model": model_key, "partition": asdict(cfg.partition), "merchants": cfg.simulation.num_merchants,
                   "max_length": cfg.train.max_length, "node": node_config})
    if model_key not in _MODELS:
        _MODELS.clear()
        _SHARDS.clear()
    if key in _SHARDS:
        _SHARDS.move_to_end(key)
    else:
        index, name, train, val, labels = _read_shard(cfg, node_config)
        if model_key not in _MODELS:
            wb = get_task(cfg).workbench(labels)
            _MODELS[model_key] = (wb, exchange.fingerprint(wb.model))
        wb = _MODELS[model_key][0]
        _SHARDS[key] = _Shard(index, name, wb.task.tokenize(train, wb), wb.task.tokenize(val, wb), labels)
        while len(_SHARDS) > MAX_CACHED_SHARDS:
            _SHARDS.popitem(last=False)
    shard = _SHARDS[key]
    wb, fingerprint = _MODELS[model_key]
    return Merchant(shard.index, shard.name, wb, fingerprint, shard.train, shard.val)


@functools.lru_cache(maxsize=4)
def _run_config(run_config_json: str) -> FedshopConfig:
    """The run's config, parsed once (≈ 40 ms) rather than by every mod and handler a message passes."""
    return from_run_config(json.loads(run_config_json))


def _privacy_mod(config_of: Callable[[Context], FedshopConfig]) -> Mod:
    def privacy(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """privacy=client: Flower's fixedclipping_mod; privacy=local: Flower's LocalDpMod; else nothing."""
        p = config_of(context).privacy
        if p.name == "client":
            return fixedclipping_mod(msg, context, call_next)
        if p.name == "local":
            return LocalDpMod(p.clipping_norm, p.clipping_norm, p.local_epsilon, p.local_delta)(msg, context,
                                                                                                call_next)
        return call_next(msg, context)

    return privacy


def _record_dp(cfg: FedshopConfig, merchant: Merchant, server_round: int,
               budget: RecordBudget) -> dp.RecordDP | wire.Declined:
    """privacy=example: this round's DP-SGD, or a decline when it would take the merchant past its budget."""
    p = cfg.privacy
    records = merchant.task.num_records(merchant.train)
    plan = dp.plan_round(p, cfg.train.batch_size, cfg.train.local_epochs, records, budget.history,
                         cfg.strategy.num_rounds - server_round + 1)
    if p.target_epsilon is not None and plan.epsilon_after > p.target_epsilon:
        reason = (f"{merchant.name}: training round {server_round} would take epsilon on its records from "
                  f"{plan.epsilon_before:.4f} to {plan.epsilon_after:.4f}, past privacy.target_epsilon="
                  f"{p.target_epsilon:g} (delta {p.delta:g})")
        log.warning("%s", reason)
        return wire.Declined(merchant.index, reason, plan.epsilon_before)
    mode = p.grad_sample_mode if p.grad_sample_mode != "auto" else "ghost" if cfg.finetune.name == "full" else "hooks"
    return dp.RecordDP(plan.noise_multiplier, p.clipping_norm, list(budget.history), mode)


def _train(cfg: FedshopConfig, merchant: Merchant, ins: wire.Instruction, context: Context,
           budget_file: Path | None) -> wire.TrainReply | wire.Declined:
    """Evaluate the received model (when asked), fine-tune it locally (DP-SGD under privacy=example, or decline
    when the merchant's budget is spent), and say what was learnt."""
    private, budget = None, RecordBudget.load(context.state, budget_file) if cfg.privacy.record_level else None
    if budget is not None:
        planned = _record_dp(cfg, merchant, ins.server_round, budget)
        if isinstance(planned, wire.Declined):
            return planned
        private = planned
    evaluated: dict[str, float] = {}
    if ins.evaluate_first:  # the received global model, before training changes it (strategy.evaluate_with_train)
        evaluated = merchant.task.evaluate(merchant.wb, merchant.val)
    metrics = merchant.task.train(merchant.wb, merchant.train, cfg.train.local_epochs,
                                  train_seed(cfg.seed, ins.server_round, merchant.index), proximal_mu=ins.proximal_mu,
                                  desc=f"{merchant.name} round {ins.server_round}", dp=private)
    spent = None
    if budget is not None and private is not None:
        spent = dp.epsilon(private.history, cfg.privacy.delta)
        budget.history = private.history
        budget.rounds.append({"round": ins.server_round, "epsilon": spent,
                              "noise_multiplier": private.noise_multiplier})
        budget.save(context.state, budget_file)
    n = int(metrics.pop(wire.NUM_EXAMPLES))
    arrays = merchant.task.exchanged(merchant.wb.model)
    if merchant.index in cfg.simulation.attackers:  # robustness tests only
        arrays = attacks.poison(arrays, wire.from_arrays(ins.arrays), cfg.simulation.attack,
                                cfg.simulation.attack_scale)
    state = MerchantState.load(context.state).trained(ins.server_round, n * cfg.train.local_epochs)
    state.save(context.state)
    return wire.TrainReply(wire.cast(wire.to_arrays(arrays), cfg.strategy.wire_dtype), n, merchant.index,
                           state.rounds_trained, metrics, evaluated, spent)


def _line(kind: str, merchant: Merchant, rnd: int, n: int, seconds: float, loss: float | None) -> str:
    """`merchant_00 round 3 train: 715 examples, 4.2 s, loss 0.9123`."""
    return (f"{merchant.name} round {rnd} {kind}: {n} examples, {seconds:.1f} s"
            + ("" if loss is None else f", loss {loss:.4f}"))


def transport_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: a message's arrays are unpacked on arrival and the reply's packed for the trip back
    (common/protocol/wire.py: pack); everything inside sees named arrays."""
    content = wire.unpack(msg.content)
    if content is not msg.content:
        msg.content = content
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = wire.pack(reply.content)
    return reply


def build_client_app(fixed_cfg: FedshopConfig | None = None, log_file: Path | None = None) -> ClientApp:
    """A ClientApp; with `fixed_cfg` (simulation) it ignores the run config, else reads it from the run. Each
    message it handles appends a line to `log_file` (simulation) or to its node config's log file (python -m
    client shows those); its Python warnings and Flower's lines go to the fedshop.log beside that file."""
    app = ClientApp(mods=[transport_mod])

    def config_of(context: Context) -> FedshopConfig:
        return fixed_cfg or _run_config(json.dumps(dict(context.run_config), sort_keys=True))

    def log_of(context: Context) -> Path | None:
        path = log_file or context.node_config.get(wire.NODE_LOG)
        return Path(str(path)) if path else None

    def note(context: Context, text: str) -> None:
        if (path := log_of(context)) is not None:
            logs.append_line(path, text)

    def receive(msg: Message, context: Context) -> tuple[FedshopConfig, Merchant, wire.Instruction]:
        cfg = config_of(context)
        ins = wire.Instruction.from_content(msg.content)
        merchant = load_merchant(cfg, dict(context.node_config))
        merchant.check_base(ins.base_fingerprint)
        merchant.task.load_exchanged(merchant.wb.model, wire.from_arrays(ins.arrays))
        return cfg, merchant, ins

    @app.lifespan()
    def lifespan(context: Context) -> Iterator[None]:
        flower_patches.apply_clientapp()  # in whichever process runs the app (a Ray actor, a forked task)
        if (path := log_of(context)) is not None:  # the run's fedshop.log, not among the message lines
            logs.warnings_to_file(path.parent / "fedshop.log")
        yield

    # secagg=plus: SecAgg+ masks what the privacy mod (clipping, local noise) hands back.
    @app.train(mods=[secure_mod(config_of), _privacy_mod(config_of)])
    def train(msg: Message, context: Context) -> Message:
        t0 = time.time()
        cfg, merchant, ins = receive(msg, context)
        path = log_of(context)
        reply = _train(cfg, merchant, ins, context, path.parent / "privacy" / f"{merchant.name}.json" if path else None)
        if isinstance(reply, wire.Declined):
            note(context, f"{merchant.name} round {ins.server_round} declined: {reply.reason}")
        else:
            note(context, _line("train", merchant, ins.server_round, reply.num_examples, time.time() - t0,
                                reply.metrics.get(wire.TRAIN_LOSS))
                 + ("" if reply.record_epsilon is None else f", epsilon {reply.record_epsilon:.4f}"))
        return Message(content=reply.to_content(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        t0 = time.time()
        cfg, merchant, ins = receive(msg, context)
        scores = merchant.task.evaluate(merchant.wb, merchant.val)
        n = int(scores.pop(wire.NUM_EXAMPLES))
        note(context, _line("evaluate", merchant, ins.server_round, n, time.time() - t0, scores.get("loss")))
        return Message(content=wire.EvaluateReply(n, merchant.index, scores).to_content(), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        merchant = load_merchant(config_of(context), dict(context.node_config))
        merchant.check_base(wire.requested_fingerprint(msg.content))
        reply = wire.QueryReply(merchant.index, merchant.name, len(merchant.train))
        note(context, f"{merchant.name} query: identified, {len(merchant.train)} train examples")
        return Message(content=reply.to_content(), reply_to=msg)

    return app


app = build_client_app()
