"""The repository is a Flower app: `flwr run .` against Flower's local simulation runtime."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.run.env import OFFLINE
from tests.conftest import ROOT
from tests.test_ray_safety import refuses_without_token


def _processes_with_home(home: Path) -> list[int]:
    """PIDs of processes whose environment has FLWR_HOME=home (the detached local SuperLink and its helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FLWR_HOME={home}".encode() in env:
            found.append(int(entry.name))
    return found


def _ray_ports(home: Path) -> dict[int, str]:
    """Listening ports of the Ray servers (GCS, raylet) among the processes with FLWR_HOME=home."""
    found = {}
    for pid in _processes_with_home(home):
        try:
            proc = psutil.Process(pid)
            if proc.name() in {"gcs_server", "raylet"}:
                found.update({c.laddr.port: proc.name() for c in proc.net_connections("tcp")
                              if c.status == psutil.CONN_LISTEN})
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_flwr_run_dot(tmp_path):
    """`flwr run .` trains with LoRA on Flower's local runtime, and the Ray that runtime starts takes Ray's token
    authentication from the environment, as README says to set it: every GCS and raylet port refuses a caller
    without the token."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    token = secrets.token_hex(32)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **OFFLINE, "FLWR_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token}
    run_dir = tmp_path / "run"
    overrides = "model=tiny finetune=lora simulation.num_merchants=2 strategy.num_rounds=2 train.progress=false"
    probed: dict[int, str] = {}
    try:
        with subprocess.Popen(["flwr", "run", ".", "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"',
                               "--stream"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                ports = _ray_ports(home)
                if not probed and {"gcs_server", "raylet"} <= set(ports.values()):
                    probed = {port: f"{name}: {refuses_without_token(port, token)}" for port, name in ports.items()}
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0]
        assert proc.returncode == 0, out[-3000:]
        assert len(probed) >= 3, probed  # the GCS and the raylet's two servers
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed"
        assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
        assert (run_dir / "model" / "config.json").is_file() and (run_dir / "adapter").is_dir()
        trains = [m for m in map(json.loads, (run_dir / "messages.jsonl").read_text().splitlines())
                  if m["type"] == "train" and not m["error"]]
        names = {n for m in trains for n in m["arrays"]["arrays"]}
        assert len(trains) == 4 and names and all(".lora_" in n or ".modules_to_save." in n for n in names)
    finally:
        for pid in _processes_with_home(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
