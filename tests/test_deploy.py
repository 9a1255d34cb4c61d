"""Real server and merchant processes over gRPC: insecure, TLS + authentication, refusals, dropouts, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_replies_carry_no_data, run_cli
from tests.deploy_helpers import BASE, Deployment, free_port


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    proc = run_cli("simulation.export_shards", [str(out), *BASE], out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    proc = run_cli("server.certs", ["--out", str(out), "--hosts", "127.0.0.1,localhost", "--merchants", "3"],
                   out.parent)
    assert proc.returncode == 0, proc.stderr
    other = out.parent / "rogue"
    assert run_cli("server.certs", ["--out", str(other), "--skip-ca", "--merchants", "1"], out.parent).returncode == 0
    return out


@pytest.fixture
def deployment(tmp_path, shards) -> Iterator[Deployment]:
    d = Deployment(tmp_path, shards, ["deploy.insecure=true"])
    yield d
    d.close()


@pytest.fixture
def secure(tmp_path, shards, certs) -> Iterator[Deployment]:
    d = Deployment(tmp_path, shards, [f"deploy.certs={certs}"])
    yield d
    d.close()


def assert_completed(d: Deployment, rounds: int = 2) -> dict:
    results = d.results()
    assert results.get("status") == "completed", d.log("server")
    assert [r["round"] for r in results["rounds"]] == list(range(rounds + 1))
    return results


def wait_live_status(url: str, d: Deployment, timeout: float = 300) -> dict:
    """The live page's status once round 1 is done (the run is still on: round 2 takes seconds more)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                status = json.load(resp)
            if status.get("rounds_done", 0) >= 1:
                return dict(status)
        except OSError:
            pass
        assert d.server is not None and d.server.poll() is None, d.log("server")
        time.sleep(0.2)
    raise AssertionError(f"the live page never showed round 1:\n{d.log('server')}")


def assert_tracked_in_mlflow(uri: str, results: dict) -> None:
    """The ServerApp logged the run to MLflow: config, every round's server metrics, the model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(results["tracking"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["finetune.name"] == "lora"
    history = client.get_metric_history(run.info.run_id, "server/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "adapter", "results.json"}


def test_insecure_server_and_three_merchants(deployment, tmp_path):
    """LoRA over gRPC: three merchant processes, the adapters (and head) the only arrays that travel."""
    from common.run import checkpoint as C

    d = deployment
    live = free_port()
    d.start_server(*LORA, f"live.port={live}", "tracking=mlflow", f"tracking.local_dir={tmp_path}/mlruns")
    for i in range(3):
        d.start_merchant(i, *LORA)
    status = wait_live_status(f"http://127.0.0.1:{live}/status", d)  # served by the ServerApp process
    assert status["connected"] == 3 and status["num_rounds"] == 2 and status["rounds"][1]["bytes_up"] > 0
    assert d.wait_server() == 0, d.log("server")
    results = assert_completed(d)
    assert_tracked_in_mlflow(f"sqlite:///{tmp_path}/mlruns/mlflow.db", results)
    assert results["merchants"] == ["merchant_00", "merchant_01", "merchant_02"]
    for r in results["rounds"][1:]:
        assert len(r["replied"]) == 3 and r["dropped"] == []
        # Context.state survives the per-message task processes: round 2 reads what round 1 wrote.
        assert {x["rounds_trained"] for x in r["replied"]} == {r["round"]}
    assert (d.run_dir / "model" / "config.json").is_file()
    # The consoles: the server one line a round; each merchant one line a message it handled.
    server_lines = d.log("server", full=True).splitlines()
    assert [sum(f"round {r} |" in line for line in server_lines) for r in range(3)] == [1, 1, 1], server_lines
    for i in range(3):
        lines = [line for line in d.log(f"m{i}", full=True).splitlines() if f"merchant_0{i} " in line]
        said = [line.split(f"merchant_0{i} ", 1)[1].split(":")[0] for line in lines]
        assert said == ["query", "round 1 train", "round 2 train", "round 2 evaluate"], lines
        assert all(" examples, " in line and " s" in line for line in lines[1:]), lines
    # One resident worker, forked from the merchant's warm fork server, ran all four messages of the run (query,
    # train x 2, final evaluate), each completed.
    for i in range(3):
        executor_log = (d.root / f"m{i}" / "executor.log").read_text()
        assert executor_log.count("resident worker started") == 1, executor_log[-2000:]
        assert executor_log.count(": to resident worker pid") == 4 == executor_log.count(": completed after")
        assert " failed after " not in executor_log and "exited with status 1" not in executor_log
    # What left the merchants, as the server received it: model arrays and scalar metrics only.
    counts = assert_replies_carry_no_data(d.run_dir)
    assert counts["train"] == 6 and counts["query"] == 3 and counts["evaluate"] == 3
    # Federated evaluation rode on the training messages (and one final evaluation): every round has it.
    for r in results["rounds"]:
        assert {"loss", "accuracy", "macro_f1"} <= set(r["evaluate"]), r
        assert sorted(e["merchant"] for e in r["evaluated"]) == results["merchants"]
    # The same seeds and config in simulation give the same final model (within 1e-6).
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    proc = run_cli("simulation", [*BASE, *LORA, f"hydra.run.dir={sim_dir}/run"], sim_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deployed = C.load(d.run_dir / "checkpoints" / "round_2.pt")["weights"]
    assert deployed and all(".lora_" in k or ".modules_to_save." in k for k in deployed)
    for r in results["rounds"][1:]:
        assert all(x["bytes_up"] < 200_000 for x in r["replied"])  # the full tiny model is 17 MB
    assert (d.run_dir / "adapter" / "adapter_config.json").is_file()
    simulated = C.load(sim_dir / "run" / "checkpoints" / "round_2.pt")["weights"]
    for key in deployed:
        np.testing.assert_allclose(deployed[key], simulated[key], atol=1e-6, rtol=0)


LORA = ["finetune=lora"]


@pytest.mark.slow
def test_a_merchant_with_another_base_model_stops_the_run(tmp_path, shards):
    """Merchant 2's own copy of the base (deploy.model_path) differs in one weight: it refuses with one line
    naming both fingerprints, and the server stops the run rather than federate over different bases."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from common.run.config import compose
    from common.tasks import model as M

    cfg = compose(["task=relevance", *BASE, *LORA])
    base = tmp_path / "base"
    M.save_final(M.build_model(cfg.model, ["negative", "neutral", "positive"], 0, compose(BASE).finetune),
                 M.load_tokenizer(cfg.model), ["negative", "neutral", "positive"], base)
    other = tmp_path / "other-base"
    model = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias[0] += 1e-3
    model.save_pretrained(other)
    M.load_tokenizer(cfg.model).save_pretrained(other)
    local = [*LORA, "model=local", f"model.path={base}"]
    d = Deployment(tmp_path, shards, ["deploy.insecure=true"])
    try:
        d.start_server(*local)
        d.start_merchant(0, *local)
        d.start_merchant(1, *local)
        d.start_merchant(2, *local, f"deploy.model_path={other}")
        assert d.wait_server() == 2
        out = d.log("server")
        line = next(x for x in out.splitlines() if x.startswith("fedshop: error:"))
        assert "merchant_02: base model fingerprint" in line and "differs from the server's" in line, out
        assert d.results()["status"] == "refused"
        mine, theirs = line.split("fingerprint ")[1].split()[0], line.split("server's ")[1].split(":")[0]
        assert len(mine) == len(theirs) == 16 and mine != theirs
    finally:
        d.close()


@pytest.mark.slow
def test_tls_with_authentication(secure, certs):
    d = secure
    d.start_server()
    for i in range(3):
        d.start_merchant(i)
    assert d.wait_server() == 0, d.log("server")
    assert_completed(d)
    assert "registered merchant key merchant_02.pub" in d.log("server")


@pytest.mark.slow
def test_flower_stock_executor_and_separate_evaluation(deployment):
    """deploy.executor=subprocess (a cold flwr-clientapp per message) with evaluation messages of its own."""
    d = deployment
    d.start_server("strategy.evaluate_with_train=false")
    for i in range(3):
        d.start_merchant(i, "deploy.executor=subprocess")
    assert d.wait_server() == 0, d.log("server")
    results = assert_completed(d)
    for r in results["rounds"][1:]:
        assert len(r["replied"]) == 3 and len(r["evaluated"]) == 3
    assert not (d.root / "m0" / "executor.log").exists()


@pytest.mark.slow
def test_unregistered_key_and_missing_ca_are_refused(secure, certs, tmp_path):
    d = secure
    d.start_server("strategy.num_rounds=1")
    rogue = d.start_merchant(0, f"deploy.key={certs.parent / 'rogue' / 'merchants' / 'merchant_00'}")
    assert rogue.wait(timeout=120) == 2
    assert "the server refused this merchant: its key is not registered there" in d.log("m0")
    no_ca = tmp_path / "no-ca"
    (no_ca / "merchants").mkdir(parents=True)
    shutil.copy(certs / "merchants" / "merchant_01", no_ca / "merchants" / "merchant_01")
    blind = d.start_merchant(1, f"deploy.certs={no_ca}")
    assert blind.wait(timeout=60) == 2
    assert f"deploy.certs: {no_ca}/ca.crt not found" in d.log("m1")
    insecure = d.start_merchant(2, "deploy.insecure=true", "deploy.connect_retries=2", "deploy.connect_wait=15")
    try:
        rc = insecure.wait(timeout=120)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc != 0
    assert d.results().get("rounds", [{}])[-1].get("round", 0) == 0  # nobody got in


def run_losing_merchant_two(d: Deployment, *more: str) -> dict:
    """Three rounds, three merchants; merchant 2 is killed (SIGKILL) after round 1. Returns results.json."""
    # Flower waits for min_available_nodes to be connected before sampling: allow for the dropout.
    d.start_server("strategy.num_rounds=3", "strategy.round_timeout=90", "strategy.min_replies=2",
                   "strategy.min_available_nodes=2", "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2",
                   *more)
    for i in range(3):
        d.start_merchant(i)
    d.wait_round(1)
    d.kill_merchant_hard(2)
    assert d.wait_server() == 0, d.log("server")
    return assert_completed(d, rounds=3)


@pytest.mark.slow
def test_merchant_killed_mid_run_is_recorded_as_dropped(deployment):
    results = run_losing_merchant_two(deployment)
    later = results["rounds"][2:]
    dropped = [x for r in later for x in r["dropped"]]
    assert any(x["merchant"] == "merchant_02" for x in dropped), later
    assert all(len(r["replied"]) >= 2 for r in later)
    assert any("timeout" in x["reason"] or "error" in x["reason"] for x in dropped)


@pytest.mark.slow
def test_client_side_dp_survives_a_lost_merchant_and_is_accounted(deployment):
    """privacy=client in deployment: merchants clip before sending (Flower's fixedclipping_mod in the deployed
    ClientApp), the server noises the mean of the replies it got, and a merchant lost mid-run costs no round."""
    clip = 0.05
    results = run_losing_merchant_two(deployment, "privacy=client", f"privacy.clipping_norm={clip}",
                                      "privacy.noise_multiplier=0.5", "privacy.population=3")
    rounds = results["rounds"][1:]
    norms = [x["update_norm"] for r in rounds for x in r["replied"]]
    assert norms and max(norms) <= clip * (1 + 1e-4)  # what reached the server was clipped by the merchant
    assert any(x["merchant"] == "merchant_02" for r in rounds[1:] for x in r["dropped"])
    assert all(r["attempts"] == 1 and len(r["replied"]) >= 2 for r in rounds)  # no DP round was lost
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert eps == sorted(eps) and len(set(eps)) == 3 and results["privacy"]["releases"] == 3
    assert "epsilon" in deployment.log("server")


@pytest.mark.slow
def test_a_restarted_merchant_continues_its_record_level_budget(deployment):
    """privacy=example over gRPC (full fine-tuning: ghost clipping): merchant 2 is killed after round 1 and
    started again on the same run directory; its epsilon goes on from what it had spent, never from zero."""
    d = deployment
    d.start_server("strategy.num_rounds=4", "strategy.round_timeout=60", "strategy.min_replies=2",
                   "strategy.min_available_nodes=2", "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2",
                   "privacy=example", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null")
    for i in range(3):
        d.start_merchant(i)
    d.wait_round(1)
    d.kill_merchant_hard(2)
    budget_file = d.root / "m2" / "privacy" / "merchant_02.json"
    before = json.loads(budget_file.read_text())["rounds"]
    d.start_merchant(2)
    assert d.wait_server() == 0, d.log("server")
    results = assert_completed(d, rounds=4)
    after = json.loads(budget_file.read_text())["rounds"]
    assert after[:len(before)] == before and len(after) > len(before), (before, after)  # trained again
    eps = [r["epsilon"] for r in after]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    told = [x for r in results["rounds"][2:] for x in r["replied"] if x["merchant"] == "merchant_02"]
    assert told and told[0]["record_epsilon"] > before[-1]["epsilon"]  # continued, not restarted at round 1's
    assert told[-1]["record_epsilon"] == pytest.approx(eps[-1])
    assert results["privacy"]["merchants"]["merchant_02"] == pytest.approx(eps[-1])


SECURE_DP = ["secagg=plus", "privacy=client", "privacy.clipping_norm=0.05", "privacy.noise_multiplier=0.5",
             "privacy.population=3"]


@pytest.mark.slow  # 2 minutes; SecAgg+ also runs in the default suite in simulation (tests/test_simulation.py)
def test_secure_aggregation_with_client_dp_across_processes(deployment):
    """secagg=plus + privacy=client over gRPC: merchants clip, mask and upload; the server unmasks only the
    sum, noises the mean and accounts it; what left the merchants is protocol values and scalar metrics."""
    d = deployment
    d.start_server(*SECURE_DP)
    for i in range(3):
        d.start_merchant(i)
    assert d.wait_server() == 0, d.log("server")
    results = assert_completed(d)
    for r in results["rounds"][1:]:
        secure = r["secure_aggregation"]
        assert [s["stage"] for s in secure["stages"]] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
        assert secure["survivors"] == 3 and secure["max_weight"] == 1.0 and r["dropped"] == []
        assert all(x["update_norm"] is None for x in r["replied"])
    assert results["privacy"]["releases"] == 2 and results["privacy"]["epsilon"] > 0
    counts = assert_replies_carry_no_data(d.run_dir)
    assert counts["train"] == 2 * 4 * 3  # rounds x SecAgg+ stages x merchants


@pytest.mark.slow
def test_secure_aggregation_survives_a_lost_merchant(deployment):
    """Merchant 2 dies after round 1: SecAgg+ (3 merchants, threshold 2) goes on with the other two."""
    results = run_losing_merchant_two(deployment, *SECURE_DP)
    later = results["rounds"][2:]
    lost = [x for r in later for x in r["dropped"] if x["merchant"] == "merchant_02"]
    assert lost and all(x["reason"].startswith("no reply in SecAgg+ stage") for x in lost), later
    assert all(r["attempts"] == 1 and r["secure_aggregation"]["survivors"] == 2 for r in later)
    assert results["privacy"]["releases"] == 3


@pytest.mark.slow
def test_malformed_shard_fails_fast_while_others_finish(deployment, tmp_path):
    d = deployment
    bad = tmp_path / "bad.csv"
    bad.write_text("review_text,merchant\nnice,merchant_02\n")
    d.start_server("strategy.min_available_nodes=2", "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2")
    d.start_merchant(0)
    d.start_merchant(1)
    broken = d.start_merchant(2, shard=bad)
    assert broken.wait(timeout=120) == 2
    out = d.log("m2")
    assert f"fedshop: error: data file {bad}: missing column 'rating_label' (data.columns.label)" in out
    assert "Traceback" not in out
    assert d.wait_server() == 0, d.log("server")
    results = assert_completed(d)
    assert results["merchants"] == ["merchant_00", "merchant_01"]


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_server_killed_after_round_one_resumes_to_the_same_model(tmp_path, shards, finetune):
    from common.run import checkpoint as C

    run = ["deploy.insecure=true", "strategy.num_rounds=3", f"finetune={finetune}"]
    straight = Deployment(tmp_path / "straight", shards, run)
    (tmp_path / "straight").mkdir()
    try:
        straight.start_server()
        for i in range(3):
            straight.start_merchant(i)
        assert straight.wait_server() == 0, straight.log("server")
    finally:
        straight.close()
    (tmp_path / "crash").mkdir()
    d = Deployment(tmp_path / "crash", shards, [*run, "checkpoint.keep_last=1"])  # resume needs only the newest
    try:
        d.start_server()
        for i in range(3):
            d.start_merchant(i)
        d.wait_round(1)
        d.kill_server_hard()
        for i in range(3):  # the merchants' machines keep running; they reconnect or are restarted
            d.kill_merchant_hard(i)
        d.start_server()
        for i in range(3):
            d.start_merchant(i)
        assert d.wait_server() == 0, d.log("server")
        assert "resuming" in d.log("server")
    finally:
        d.close()
    a = C.load(straight.run_dir / "checkpoints" / "round_3.pt")
    b = C.load(d.run_dir / "checkpoints" / "round_3.pt")
    for key in a["weights"]:
        np.testing.assert_array_equal(a["weights"][key], b["weights"][key])
    assert [r["round"] for r in b["history"]] == [0, 1, 2, 3]
    assert [p.name for p in (d.run_dir / "checkpoints").iterdir()] == ["round_3.pt"]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def two_hosts() -> Iterator[dict[str, str]]:
    """Two network namespaces joined by a veth pair: server 10.203.7.1, merchants 10.203.7.2 (made and removed here)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"fs{os.getpid() % 100000}"
    hosts = {"server": f"{tag}a", "merchants": f"{tag}b"}
    try:
        for ns in hosts.values():
            if _ip("netns", "add", ns).returncode != 0:
                pytest.skip(f"cannot create network namespace {ns}")
        assert _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb").returncode == 0
        for ns, dev, addr in ((hosts["server"], f"{tag}va", "10.203.7.1/24"),
                              (hosts["merchants"], f"{tag}vb", "10.203.7.2/24")):
            assert _ip("link", "set", dev, "netns", ns).returncode == 0
            assert _ip("-n", ns, "addr", "add", addr, "dev", dev).returncode == 0
            assert _ip("-n", ns, "link", "set", dev, "up").returncode == 0
            assert _ip("-n", ns, "link", "set", "lo", "up").returncode == 0
        yield hosts
    finally:
        for ns in hosts.values():
            _ip("netns", "del", ns)


@pytest.mark.slow
def test_separate_hosts_in_network_namespaces(tmp_path, shards, two_hosts):
    pki = tmp_path / "certs"
    proc = run_cli("server.certs", ["--out", str(pki), "--hosts", "10.203.7.1", "--merchants", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = Deployment(tmp_path, shards, [f"deploy.certs={pki}"], host="10.203.7.1", netns=two_hosts)
    try:
        d.start_server()
        for i in range(3):
            d.start_merchant(i)
        assert d.wait_server() == 0, d.log("server")
        assert_completed(d)
        assert "10.203.7.1" in (d.run_dir / "superlink.log").read_text()
    finally:
        d.close()
