"""Fast unit tests of what a run keeps and shows: checkpoint pruning, the console filter, MLflow names, the live
page's server and status document."""

from __future__ import annotations

import json
import logging
import urllib.request

import numpy as np
import pytest

from common.run import checkpoint as C
from common.run import logs, tracking
from common.run.errors import FedshopError
from server.live import LivePage, status


def _history(values: list[float]) -> list[dict]:
    return [{"round": r, "server": {"accuracy": v, "loss": 1 - v}, "seconds": 2.0, "sampled": [{"node": 1}] * 3,
             "replied": [{"node": 1}] * 2, "dropped": [{"node": 3, "merchant": "m3", "reason": "timed out"}],
             "bytes_down_total": 100 * r, "bytes_up_total": 90 * r} for r, v in enumerate(values)]


def test_prune_keeps_the_newest_and_the_named_rounds(tmp_path):
    for r in range(6):
        C.save(tmp_path / f"round_{r}.pt", server_round=r, weights={"w": np.zeros(2, np.float32)}, config_json="{}",
               strategy_state={}, history=[], base_fingerprint="b")
    assert C.prune(tmp_path, 2, {1}) == [0, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1.pt", "round_4.pt", "round_5.pt"]
    assert C.latest(tmp_path) == tmp_path / "round_5.pt"
    assert C.prune(tmp_path, 1, set()) == [1, 4]


def test_best_round_by_max_or_min_and_a_clear_error_for_an_unknown_metric():
    history = _history([0.2, 0.6, 0.6, 0.5])
    assert C.best_round(history, "accuracy", "max") == 1  # the earliest of a tie
    assert C.best_round(history, "loss", "min") == 1
    with pytest.raises(FedshopError, match=r"checkpoint.best_metric='f1'.*\['accuracy', 'loss'\]"):
        C.best_round(history, "f1", "max")


def test_console_shows_fedshop_lines_and_only_errors_of_other_libraries():
    console = logs.Console()

    def shown(name: str, level: int) -> bool:
        return console.filter(logging.LogRecord(name, level, __file__, 1, "x", None, None))

    assert shown("common.run.results", logging.INFO) and shown("fedshop", logging.INFO)
    assert shown("server.federation", logging.WARNING)
    assert not shown("alembic.runtime.plugins", logging.INFO) and not shown("py.warnings", logging.WARNING)
    assert not shown("mlflow.store.db.utils", logging.INFO) and shown("ray", logging.ERROR)
    record = logging.LogRecord("fedshop", logging.WARNING, __file__, 1, "careful", None, None)
    assert logs.ConsoleFormat().format(record).split(" ", 1)[1] == "warning: careful"


def test_mlflow_names_and_round_metrics():
    assert tracking.metric_name("server", "ndcg@10") == "server/ndcg_at_10"
    record = {"round": 2, "server": {"accuracy": 0.5, "ndcg@10": 0.9}, "train": {"train-loss": 0.7},
              "evaluate": {"loss": 0.8, "num-examples": 40}, "bytes_down_total": 1000, "bytes_up_total": 990,
              "seconds": 4.5, "privacy": {"epsilon": 1.25, "delta": 1e-5}}
    assert tracking.round_metrics(record) == {
        "server/accuracy": 0.5, "server/ndcg_at_10": 0.9, "merchants_train/train-loss": 0.7,
        "merchants_eval/loss": 0.8, "merchants_eval/num-examples": 40.0, "bytes/down": 1000.0, "bytes/up": 990.0,
        "round/seconds": 4.5, "privacy/epsilon": 1.25}


def test_flat_params_name_every_config_leaf(tiny_cfg):
    params = tracking.flat_params(tiny_cfg)
    assert params["model.name"] == "tiny" and params["train.lr"] == "0.001"
    assert params["finetune.target_modules"].startswith("[") and params["data.path"] == "null"
    assert len(params) > 100


def test_status_document_progress_eta_and_last_round():
    doc = status(_history([0.2, 0.5, 0.6]), title="t", state="running", rnd=3, num_rounds=5, phase="training",
                 connected=4, round_seconds=0.5, epsilon=None)
    assert doc["rounds_done"] == 2 and doc["eta_seconds"] == pytest.approx(2.0 * 3 - 0.5)
    assert doc["last_round"] == {"round": 2, "sampled": 3, "replied": 2,
                                 "dropped": [{"merchant": "m3", "reason": "timed out"}]}
    assert [p["accuracy"] for p in doc["rounds"]] == [0.2, 0.5, 0.6]
    done = status(_history([0.2]), title="t", state="completed", rnd=0, num_rounds=1, phase="done", connected=1,
                  round_seconds=0.0, epsilon=0.5)
    assert done["eta_seconds"] is None and done["epsilon"] == 0.5


def test_live_page_serves_html_and_status_on_loopback_and_moves_off_a_taken_port():
    first = LivePage(0)
    try:
        port = int(first.url.rsplit(":", 1)[1].strip("/"))
        second = LivePage(port)  # taken: any free port instead
        try:
            assert second.url != first.url and second.url.startswith("http://127.0.0.1:")
        finally:
            second.close()
        first.publish({"round": 2, "status": "running"})
        with urllib.request.urlopen(first.url + "status", timeout=5) as resp:
            assert json.load(resp) == {"round": 2, "status": "running"}
        with urllib.request.urlopen(first.url, timeout=5) as resp:
            page = resp.read().decode()
        assert "<svg id=\"chart\"" in page and "fetch(\"status\"" in page
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(first.url + "nothing", timeout=5)
    finally:
        first.close()


def test_mlflow_missing_or_unreachable_is_one_clear_error(tiny_cfg, tmp_path, monkeypatch):
    from dataclasses import replace

    from tests.deploy_helpers import free_port

    cfg = replace(tiny_cfg, tracking=replace(tiny_cfg.tracking, name="mlflow", experiment="x",
                                             uri=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(FedshopError, match=r"tracking.uri=http://127.0.0.1:\d+: could not start an MLflow run"):
        tracking.open_tracker(cfg, tmp_path, "federated")
    monkeypatch.setitem(__import__("sys").modules, "mlflow.tracking", None)
    with pytest.raises(FedshopError, match=r"tracking=mlflow needs MLflow .*pip install -e '.\[tracking\]'"):
        tracking.open_tracker(cfg, tmp_path, "federated")
