"""The Ray under a simulation: loopback only, every Ray server refuses a call without the token, and an existing
multi-node Ray cluster is joined, used on all its nodes and left running."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from common.run.env import OFFLINE
from tests.conftest import ROOT, TINY_REVIEWS

# One method of each Ray gRPC service: a server answers UNIMPLEMENTED for the services it does not have.
RAY_METHODS = ["/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Push", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats"]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Flower's Ray actor that runs the merchants' ClientApp ("ray::ClientAppActor"; the kernel's process name keeps 15
# characters, "ray::ClientAppA", and psutil reads the full one only while the process still lives)
ACTOR = "ClientAppA"


def listening(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, for every listening TCP socket of root and all its descendants."""
    found: dict[tuple[str, int], str] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except psutil.Error:
            continue
    return found


def grpc_status(port: int, method: str, token: str | None) -> str:
    """The status code name of an empty unary call to 127.0.0.1:port, with or without Ray's bearer token."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=5, metadata=metadata)
        except grpc.RpcError as err:
            return str(err.code().name)
    return "OK"


def http_status(port: int, token: str | None) -> int:
    """The HTTP status of a call to the runtime-env agent (an HTTP server), with or without the token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/get_or_create_runtime_env", data=b"", headers=headers)
    try:
        return int(urllib.request.urlopen(req, timeout=5).status)
    except urllib.error.HTTPError as err:
        return err.code


def refuses_without_token(port: int, token: str) -> str:
    """How the Ray server on `port` answers: it must refuse without the token and serve with it."""
    for method in RAY_METHODS:
        without = grpc_status(port, method, None)
        if without == "UNAVAILABLE":  # not a gRPC server: the runtime-env agent speaks HTTP
            assert (http_status(port, None), http_status(port, token)) == (401, 200), port
            return "http 401 without token"
        if without != "UNIMPLEMENTED":
            assert without == "UNAUTHENTICATED", (port, method, without)
            assert grpc_status(port, method, token) != "UNAUTHENTICATED", (port, method)
            return f"{method.rsplit('/', 1)[1]} UNAUTHENTICATED without token"
    raise AssertionError(f"port {port}: no Ray service answered")


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def refused_tcp(address: str, port: int) -> bool:
    """True when nothing accepts a TCP connection on address:port (refused, unreachable or timed out)."""
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((address, port)) != 0


def simulate(args: list[str], cwd: Path, env: dict[str, str],
             while_running: Callable[[psutil.Process], None]) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`python -m simulation args`; while_running(process) is called every 0.3 s until it exits."""
    with subprocess.Popen([sys.executable, "-m", "simulation", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as popen:
        root = psutil.Process(popen.pid)
        deadline = time.time() + 600
        try:
            while popen.poll() is None and time.time() < deadline:
                while_running(root)
                time.sleep(0.3)
        finally:
            if popen.poll() is None:
                popen.kill()
            out = popen.communicate()[0]
    results = sorted(cwd.glob("outputs/*/*/results.json"))
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, ""), (
        json.loads(results[-1].read_text()) if results else None)


def clean_env(**more: str) -> dict[str, str]:
    """The test's environment without any Ray settings of the caller's, plus the offline variables and more."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "FLWR_HOME"}
    return {**env, **OFFLINE, "PYTHONPATH": str(ROOT), **more}


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory) -> dict[str, Any]:
    """A 3-round, 2-merchant simulation whose process tree is watched: sockets, and each Ray port probed."""
    cwd = tmp_path_factory.mktemp("ray_safety")
    token = secrets.token_hex(32)  # the user's own token (RAY_AUTH_TOKEN): the test can then make the control call
    seen: dict[tuple[str, int], str] = {}
    probed: dict[int, str] = {}
    wide: dict[str, bool] = {}
    live = free_port()  # the live page (server/live.py): loopback too, and no Ray port

    def watch(root: psutil.Process) -> None:
        now = listening(root)
        seen.update(now)
        if not probed and any(ACTOR in name for name in now.values()):
            for (_, port), name in now.items():
                if port != live:
                    probed[port] = f"{name}: {refuses_without_token(port, token)}"
                wide.update({f"{a}:{port}": refused_tcp(a, port) for a in other_addresses()})

    proc, results = simulate([*TINY_REVIEWS, "simulation.num_merchants=2", "simulation.client_cpus=1",
                              "strategy.num_rounds=3", f"live.port={live}"], cwd, clean_env(RAY_AUTH_TOKEN=token),
                             watch)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return {"seen": seen, "probed": probed, "wide": wide, "results": results, "output": proc.stdout, "live": live}


def test_simulation_listens_on_loopback_only(watched_run):
    seen = watched_run["seen"]
    assert watched_run["results"]["status"] == "completed"
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names and any(ACTOR in n for n in names), names
    wider = {f"{ip}:{port} ({name})" for (ip, port), name in seen.items() if ip not in LOOPBACK}
    assert not wider, wider
    assert ("127.0.0.1", watched_run["live"]) in seen  # the live page, on loopback
    assert "Ray on 127.0.0.1 only, token authentication" in watched_run["output"]


def test_every_ray_port_refuses_a_caller_without_the_token(watched_run):
    """Each port the run's Ray listened on, probed while merchants ran: refused without the token (gRPC
    UNAUTHENTICATED or HTTP 401), served with it; from this machine's other addresses, nothing accepts at all."""
    probed, wide = watched_run["probed"], watched_run["wide"]
    ray_ports = {port for (_, port), name in watched_run["seen"].items() if port != watched_run["live"]}
    assert len(probed) >= 5 and set(probed) <= ray_ports, probed  # GCS, 2 raylet, agent, driver, actors
    assert any("gcs_server" in v for v in probed.values()) and any(ACTOR in v for v in probed.values())
    if other_addresses():
        assert wide and all(wide.values()), wide


def ray_cli(*args: str, env: dict[str, str]) -> None:
    """`ray args` from this virtual environment."""
    subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, check=True, capture_output=True,
                   timeout=180)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the Ray cluster this test started: those that name its own --temp-dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_a_simulation_joins_a_two_node_ray_cluster_and_leaves_it_running(tmp_path):
    """Two `ray start` nodes (head and worker, 1 CPU each, token authentication) on this machine: with
    simulation.ray_address the merchants run on both nodes, and after the run both nodes are still there."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                *common, env=env)
        ray_cli("start", f"--address=127.0.0.1:{port}", *common, env=env)
        raylets = {p.pid for p in cluster_processes(temp_dir) if p.name() == "raylet"}
        assert len(raylets) == 2, raylets
        actors_on: set[int] = set()

        def watch(_: psutil.Process) -> None:
            for pid in raylets:
                if any(ACTOR in c.name() for c in psutil.Process(pid).children(recursive=True)):
                    actors_on.add(pid)

        proc, results = simulate([*TINY_REVIEWS, "simulation.num_merchants=4", "simulation.client_cpus=1",
                                  "strategy.num_rounds=2", f"simulation.ray_address=127.0.0.1:{port}"],
                                 tmp_path, env, watch)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert results["status"] == "completed" and len(results["rounds"][-1]["replied"]) == 4
        assert f"joined Ray cluster 127.0.0.1:{port}: 2 nodes, 2 CPUs" in proc.stdout
        assert actors_on == raylets, (actors_on, raylets)  # merchants ran on both nodes
        assert all(psutil.pid_exists(pid) for pid in raylets)  # the cluster fedshop joined is still running
        check = f"import ray; ray.init(address='127.0.0.1:{port}'); print(sum(n['Alive'] for n in ray.nodes()))"
        alive = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
        assert alive.stdout.strip().splitlines()[-1] == "2", alive.stderr[-2000:]
        # A driver with another token is refused (after Ray's retries) with what to set.
        wrong = subprocess.run([sys.executable, "-m", "simulation", *TINY_REVIEWS, "simulation.num_merchants=4",
                                f"simulation.ray_address=127.0.0.1:{port}"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300, env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
        assert wrong.returncode == 2 and "could not join the Ray cluster" in wrong.stderr, wrong.stderr[-2000:]
        assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" in wrong.stderr
    finally:
        started = cluster_processes(temp_dir)  # end only the cluster this test started, by PID
        for proc in [*started, *(c for p in started for c in p.children(recursive=True))]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_joining_no_cluster_stops_the_run_at_once(tmp_path):
    """simulation.ray_address where nothing listens: exit status 2 and one line saying so, not Ray's retries."""
    from tests.conftest import run_cli

    address = f"127.0.0.1:{free_port()}"
    proc = run_cli("simulation", [*TINY_REVIEWS, "simulation.num_merchants=2", f"simulation.ray_address={address}"],
                   tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"fedshop: error: simulation.ray_address={address}: no Ray cluster listens there" in proc.stderr
