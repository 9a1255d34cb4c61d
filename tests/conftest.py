"""Shared fixtures: offline environment, tiny configs, subprocess runner for the launchers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from common.run.env import OFFLINE, set_offline

ROOT = Path(__file__).resolve().parent.parent
set_offline()
# datasets' Arrow caches of the data files tests write (common/data.read_file) go to a directory of the session's
# own, not the user's ~/.cache; set before anything imports datasets, and inherited by the processes tests start.
_DATASETS_CACHE = tempfile.TemporaryDirectory(prefix="fedshop-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE.name

# Fast settings for the tiny random-init model on the built-in review data (learnable in seconds).
# Full fine-tuning: the tiny model's base is random, so freezing it (finetune=lora, the default) would leave little to
# learn; the LoRA tests ask for it explicitly.
TINY = ["task=relevance",
        "model=tiny", "finetune=full", "train.progress=false", "train.lr=1e-3", "train.warmup_ratio=0.0",
        "train.local_epochs=2"]
TINY_REVIEWS = [*TINY, "task=sentiment", "data.synthetic.num_reviews=1200"]


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` in cwd with the offline environment; output captured."""
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    env.pop("FLWR_HOME", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """In-process tests build Flower messages, which need a task identity, as inside a running ServerApp."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture
def tiny_cfg():
    """A composed, validated config for the tiny model on the review data (3 merchants)."""
    from common.run.config import compose

    return compose(["task=relevance", *TINY_REVIEWS, "simulation.num_merchants=3"])


def assert_replies_carry_no_data(run_dir: Path, wire_dtype: str = "float32") -> dict[str, int]:
    """Every message the merchants sent (the server's audit, messages.jsonl) carries only the exchanged arrays
    (all weights, or the adapters and head with LoRA; in `wire_dtype`) and scalar metrics: no text but the
    merchant's configured name, no token ids, no per-example values. Returns how many replies of each type
    were checked."""
    import json

    from common.run import checkpoint as C

    newest = C.latest(run_dir / "checkpoints")  # any round: the exchanged names and shapes never change
    assert newest is not None
    weights = C.load(newest)["weights"]
    model: dict[str, dict[str, Any]] = {k: {"dtype": wire_dtype, "shape": list(v.shape)} for k, v in weights.items()}
    assert all(v["dtype"].startswith("float") for v in model.values())
    names = set(json.loads((run_dir / "results.json").read_text()).get("merchants") or [])
    counts: dict[str, int] = {}
    for line in (run_dir / "messages.jsonl").read_text().splitlines():
        msg = json.loads(line)
        if msg["error"]:
            continue
        counts[msg["type"]] = counts.get(msg["type"], 0) + 1
        for record in msg["metrics"].values():
            assert set(record.values()) <= {"int", "float"}, record  # scalars only: no lists, no per-example
        if msg["type"] == "train" and "secaggplus_configs" in msg["configs"]:
            _assert_secagg_reply(msg, weights)
        elif msg["type"] == "train":
            assert set(msg["arrays"]) == {"arrays"}
            got = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in msg["arrays"]["arrays"].items()}
            assert got == model  # exactly the model's parameters: names, shapes, float dtypes
            assert msg["configs"] == {}
        elif msg["type"] == "evaluate":
            assert msg["arrays"] == {} and msg["configs"] == {}
        else:
            assert msg["type"] == "query" and msg["arrays"] == {}
            assert set(msg["configs"]) == {"info"} and set(msg["configs"]["info"]) == {"merchant-name"}
            assert not names or msg["configs"]["info"]["merchant-name"] in names
    assert counts.get("train", 0) > 0, counts
    return counts


def _assert_secagg_reply(msg: dict[str, Any], weights: dict[str, Any]) -> None:
    """A SecAgg+ stage reply carries only protocol values: public keys, encrypted key shares, node ids, secret
    shares, or (with the training stage's scalar metrics) one masked uint32 vector per model array."""
    protocol = msg["configs"]["secaggplus_configs"]
    if set(protocol) == {"masked_params"}:
        assert msg["arrays"] == {"fitres.parameters": {}}  # Flower's mod empties the parameters it masked
        assert set(msg["configs"]) == {"secaggplus_configs", "fitres.metrics", "fitres.status"}
        assert set(msg["configs"]["fitres.metrics"].values()) <= {"int", "float"}
        assert msg["configs"]["fitres.status"] == {"code": "int", "message": ""}
        masked = protocol["masked_params"]
        params = sum(v.size for v in weights.values())
        assert masked["list"] == "bytes" and masked["len"] == len(weights) + 1  # + the weight factor
        assert 4 * params <= masked["bytes"] <= 4 * params + 200 * masked["len"]  # uint32 + npy headers
        return
    assert msg["arrays"] == {} and msg["metrics"] == {}
    assert set(msg["configs"]) == {"secaggplus_configs"}
    if set(protocol) == {"pk1", "pk2"}:
        assert protocol == {"pk1": "bytes", "pk2": "bytes"}
    else:
        lists = {"dsts": "int", "ctxts": "bytes"} if "ctxts" in protocol else {"nids": "int", "shares": "bytes"}
        assert {k: v["list"] for k, v in protocol.items()} == lists, protocol
