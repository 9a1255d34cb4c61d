"""Flower ClientApp: a merchant fine-tunes the global model on its private shard (thin glue over common/)."""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client import zero_safe_clipping
from client.secure import secure_mod
from common import attacks
from common import data as D
from common import model as M
from common import train as T
from common.config import FedshopConfig, from_run_config, to_json

log = logging.getLogger(__name__)
zero_safe_clipping.install()
# A train message whose config has EVALUATE_FIRST=1 asks for the received model's validation metrics too;
# they come back in the train reply's MetricRecord under EVAL_PREFIX.
EVALUATE_FIRST = "evaluate-first"
EVAL_PREFIX = "eval-"


@dataclass
class Merchant:
    """What a merchant keeps between messages: its tokenised shard (the model skeleton is shared)."""

    index: int
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train: datasets.Dataset
    val: datasets.Dataset
    gains: list[float] | None


# One model skeleton per process (weights are overwritten by every message) and the tokenised shards of
# the most recent merchants this process served (a simulation actor serves many virtual merchants).
_MODELS: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_SHARDS: OrderedDict[tuple[str, str], tuple[int, str, datasets.Dataset, datasets.Dataset, list[str]]] = OrderedDict()
MAX_CACHED_SHARDS = 64


def load_merchant(cfg: FedshopConfig, node_config: dict[str, Any]) -> Merchant:
    """This node's shard (a local file in deployment, a partition in simulation), tokenised and cached."""
    cfg_key = to_json(cfg)
    key = (cfg_key, repr(sorted(node_config.items())))
    if key in _SHARDS:
        _SHARDS.move_to_end(key)
    if cfg_key not in _MODELS:
        _MODELS.clear()
        T.configure_threads(cfg.train)
        _SHARDS.clear()
    if key not in _SHARDS:
        if node_config.get("shard"):
            index = int(node_config.get("merchant-index", 0))
            name = str(node_config.get("merchant-name") or f"merchant_{index:02d}")
            train, val, labels = D.load_shard(str(node_config["shard"]), cfg, name)
        else:
            fd = D.prepare(cfg)
            index = int(node_config["partition-id"])
            train, val, labels, name = fd.train[index], fd.val[index], fd.labels, fd.names[index]
        if cfg_key not in _MODELS:
            _MODELS[cfg_key] = (M.build_model(cfg.model, labels, cfg.seed), M.load_tokenizer(cfg.model))
        tokenizer = _MODELS[cfg_key][1]
        _SHARDS[key] = (index, name, M.tokenize(train, tokenizer, cfg.train.max_length),
                        M.tokenize(val, tokenizer, cfg.train.max_length), labels)
        while len(_SHARDS) > MAX_CACHED_SHARDS:
            _SHARDS.popitem(last=False)
    index, name, train_tok, val_tok, labels = _SHARDS[key]
    model, tokenizer = _MODELS[cfg_key]
    return Merchant(index=index, name=name, model=model, tokenizer=tokenizer, train=train_tok, val=val_tok,
                    gains=D.label_gains(cfg.data, labels))


def to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy weights -> Flower ArrayRecord (key order kept)."""
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy weights."""
    return {k: v.numpy() for k, v in record.items()}


@functools.lru_cache(maxsize=4)
def _run_config(run_config_json: str) -> FedshopConfig:
    """The run's config, parsed once (≈ 40 ms) rather than by every mod and handler a message passes."""
    return from_run_config(json.loads(run_config_json))


def build_client_app(fixed_cfg: FedshopConfig | None = None) -> ClientApp:
    """A ClientApp; with `fixed_cfg` (simulation) it ignores the run config, else reads it from the run."""
    app = ClientApp()

    def config_of(context: Context) -> FedshopConfig:
        return fixed_cfg or _run_config(json.dumps(dict(context.run_config), sort_keys=True))

    def privacy(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """privacy=client: Flower's fixedclipping_mod; privacy=local: Flower's LocalDpMod; else nothing."""
        p = config_of(context).privacy
        if p.name == "client":
            return fixedclipping_mod(msg, context, call_next)
        if p.name == "local":
            return LocalDpMod(p.clipping_norm, p.clipping_norm, p.local_epsilon, p.local_delta)(msg, context,
                                                                                                call_next)
        return call_next(msg, context)

    def setup(msg: Message, context: Context) -> tuple[FedshopConfig, Merchant, int]:
        cfg = config_of(context)
        merchant = load_merchant(cfg, dict(context.node_config))
        M.set_weights(merchant.model, from_arrays(msg.content.array_records["arrays"]))
        return cfg, merchant, int(str(msg.content.config_records["config"]["server-round"]))

    # secagg=plus: SecAgg+ masks what the privacy mod (clipping, local noise) hands back.
    @app.train(mods=[secure_mod(config_of), privacy])
    def train(msg: Message, context: Context) -> Message:
        cfg, merchant, rnd = setup(msg, context)
        config = msg.content.config_records["config"]
        mu = float(str(config.get("proximal-mu", 0.0)))
        evaluated: dict[str, float | int] = {}
        if int(str(config.get(EVALUATE_FIRST, 0))):
            # The received global model, evaluated before training changes it (see strategy.evaluate_with_train).
            scores = T.evaluate(merchant.model, merchant.val, merchant.tokenizer, cfg.train, merchant.gains)
            evaluated = {f"{EVAL_PREFIX}{k}": v for k, v in scores.items()}
        seed = cfg.seed * 1_000_003 + rnd * 1009 + merchant.index
        metrics = T.train(merchant.model, merchant.train, merchant.tokenizer, cfg.train, cfg.train.local_epochs,
                          seed, proximal_mu=mu, desc=f"{merchant.name} round {rnd}")
        weights = M.get_weights(merchant.model)
        if merchant.index in cfg.simulation.attackers:  # robustness tests only
            received = from_arrays(msg.content.array_records["arrays"])
            weights = attacks.poison(weights, received, cfg.simulation.attack, cfg.simulation.attack_scale)
        reply = RecordDict({"arrays": to_arrays(weights),
                            "metrics": MetricRecord({**metrics, **evaluated, "merchant-index": merchant.index})})
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, merchant, _ = setup(msg, context)
        metrics = T.evaluate(merchant.model, merchant.val, merchant.tokenizer, cfg.train, merchant.gains)
        reply = RecordDict({"metrics": MetricRecord({**metrics, "merchant-index": merchant.index})})
        return Message(content=reply, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        merchant = load_merchant(cfg, dict(context.node_config))
        reply = RecordDict({"metrics": MetricRecord({"merchant-index": merchant.index,
                                                     "num-examples": len(merchant.train)}),
                            "info": ConfigRecord({"merchant-name": merchant.name})})
        return Message(content=reply, reply_to=msg)

    return app


app = build_client_app()
