"""One tracked simulation with LoRA and float16 on the wire: a real MLflow server (SQLite), the live page in a
real headless browser, bounded checkpoints, a quiet console, one line per merchant message, and only
half-precision adapters on the wire."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, chromium_path
from tests.conftest import ROOT, TINY_REVIEWS, assert_replies_carry_no_data
from tests.deploy_helpers import free_port

ROUNDS = 3


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered at {url}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts; ended after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                             str(root / "artifacts"), "--workers", "1"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory) -> dict[str, Any]:
    """A 3-round LoRA simulation (float16 on the wire) tracked in MLflow; while it runs, a headless Chromium loads
    its live page."""
    chromium_path()
    cwd = tmp_path_factory.mktemp("tracked")
    live = free_port()
    args = [*TINY_REVIEWS, "simulation.num_merchants=3", f"strategy.num_rounds={ROUNDS}", "tracking=mlflow",
            f"tracking.uri={mlflow_server}", "tracking.experiment=fedshop-test", f"live.port={live}",
            "finetune=lora", "strategy.wire_dtype=float16", "train.lr=5e-3",
            "checkpoint.best_metric=accuracy", f"hydra.run.dir={cwd / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLWR_HOME", None)
    proc = subprocess.Popen([sys.executable, "-m", "simulation", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[str, Any] = {}
    try:
        _wait_http(f"http://127.0.0.1:{live}/status", proc, 180)
        deadline = time.time() + 300
        while json.loads(_get(f"http://127.0.0.1:{live}/status")).get("rounds_done", 0) < 1:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its page showed round 1"
            time.sleep(0.5)
        browser = Browser(f"http://127.0.0.1:{live}/")
        try:
            seen["round"] = browser.wait_for("document.getElementById('round').textContent.includes('/ 3') && "
                                             "document.getElementById('round').textContent")
            seen["lines"] = browser.wait_for("document.querySelectorAll('#chart polyline').length")
            seen["points"] = browser.js("document.querySelector('#chart polyline').getAttribute('points')")
            seen["status"] = browser.js("document.getElementById('status').textContent")
            seen["connected"] = browser.js("document.getElementById('connected').textContent")
            seen["bytes"] = browser.js("document.getElementById('bytes').textContent")
            seen["screenshot"] = cwd / "live_page.png"
            browser.screenshot(seen["screenshot"])
        finally:
            browser.close()
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return {"run_dir": cwd / "run", "stdout": out, "stderr": err, "seen": seen, "uri": mlflow_server}


def test_live_page_renders_in_a_browser_while_the_run_is_on(tracked):
    seen = tracked["seen"]
    assert seen["status"] == "running"
    current = int(seen["round"].split("/")[0])
    assert 1 <= current <= ROUNDS, seen["round"]
    assert seen["lines"] == 2  # accuracy and macro-F1 (the review data has no ranking, so no nDCG@10)
    assert len(seen["points"].split()) >= 2  # round 0 and at least round 1
    assert seen["connected"] == "3"
    down, up = (float(x) for x in seen["bytes"].split("/"))
    assert down > 0 and up > 0
    png = seen["screenshot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    results = json.loads((tracked["run_dir"] / "results.json").read_text())
    assert results["live_page"].startswith("http://127.0.0.1:")


def test_mlflow_run_has_config_round_metrics_and_model(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    results = json.loads((tracked["run_dir"] / "results.json").read_text())
    client = MlflowClient(tracking_uri=tracked["uri"])
    run = client.get_run(results["tracking"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.num_rounds"] == str(ROUNDS) and run.data.params["model.name"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "server/accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(ROUNDS + 1))
    by_step = {m.step: m.value for m in history}
    assert by_step[ROUNDS] == pytest.approx(results["final"]["accuracy"])
    for name in ("server/macro_f1", "merchants_train/train-loss", "merchants_eval/loss", "bytes/up", "bytes/down"):
        assert client.get_metric_history(run.info.run_id, name), name
    up = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bytes/up")}
    assert up[1] == results["rounds"][1]["bytes_up_total"]
    local = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path)))
    assert json.loads((local / "config.json").read_text()) == json.loads(
        (tracked["run_dir"] / "model" / "config.json").read_text())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "results.json", "metrics.png"}


def test_checkpoints_keep_the_last_two_and_the_best(tracked):
    run_dir = tracked["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    accuracy = {r["round"]: r["server"]["accuracy"] for r in results["rounds"]}
    best = max(accuracy, key=lambda r: (accuracy[r], -r))
    assert results["best_checkpoint"] == {"round": best, "metric": "accuracy", "mode": "max"}
    kept = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*.pt"))
    assert kept == sorted({ROUNDS - 1, ROUNDS, best})


def test_console_is_one_line_a_round_and_merchants_log_one_line_a_message(tracked):
    lines = tracked["stdout"].splitlines()
    assert sum(" | acc " in line for line in lines) == ROUNDS + 1
    assert not [line for line in lines if "alembic" in line or "Warning" in line or "mlflow." in line], lines
    assert "Warning" not in tracked["stderr"] and "ClientAppActor" not in tracked["stderr"], tracked["stderr"][-2000:]
    log = (tracked["run_dir"] / "fedshop.log").read_text()
    assert "round 1 |" in log and "live page: http://127.0.0.1:" in log
    # The merchants' warnings and Flower's lines in its Ray actors are there too (transformers 5 + peft warn of a
    # deprecation in every merchant; Flower logs the actor's end), not on the console.
    assert "][merchant pid " in log and "ClientAppActor" in log
    merchants = (tracked["run_dir"] / "merchants.log").read_text().splitlines()
    train = [line for line in merchants if " train: " in line]
    assert len(train) == 3 * ROUNDS
    assert all(" examples, " in line and ", loss " in line for line in train)
    assert sum(" evaluate: " in line for line in merchants) == 3  # the last round's federated evaluation


def test_lora_with_float16_on_the_wire_sends_only_half_precision_adapters(tracked):
    """finetune=lora + strategy.wire_dtype=float16: only the adapters and the head travel, as float16 both ways;
    the server keeps and checkpoints them in float32; the merged model and the peft adapter are written."""
    from common.run import checkpoint as C
    from common.run.config import compose
    from common.tasks import model as M

    run_dir = tracked["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["finetune"] == "lora"
    exchanged = C.load(run_dir / "checkpoints" / f"round_{ROUNDS}.pt")["weights"]
    assert {str(v.dtype) for v in exchanged.values()} == {"float32"}
    assert all(".lora_" in k or ".modules_to_save." in k for k in exchanged)
    size = 2 * sum(v.size for v in exchanged.values())  # float16 bytes of the exchanged arrays
    cfg = compose(["task=relevance", *TINY_REVIEWS, "simulation.num_merchants=3"])
    full = 4 * sum(p.numel() for p in M.build_model(cfg.model, results["labels"], cfg.seed, cfg.finetune).parameters())
    for r in results["rounds"][1:]:
        assert all(size <= x["bytes_up"] <= size + 2000 and size <= x["bytes_down"] <= size + 2000
                   for x in r["replied"])
        assert all(x["bytes_up"] < full / 50 for x in r["replied"])
    counts = assert_replies_carry_no_data(run_dir, wire_dtype="float16")
    assert counts["train"] == 3 * ROUNDS
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert results["rounds"][ROUNDS]["server"]["loss"] < results["rounds"][0]["server"]["loss"]
