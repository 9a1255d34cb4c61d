"""Start real server / merchant processes (python -m server / python -m client) and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

BASE = ["task=relevance", "model=tiny", "finetune=full", "train.progress=false", "train.num_threads=1", "train.lr=1e-3",
        "train.warmup_ratio=0.0", "train.local_epochs=1", "task=sentiment", "data.synthetic.num_reviews=600",
        "simulation.num_merchants=3", "strategy.num_rounds=2", "strategy.min_available_nodes=3",
        "strategy.min_train_nodes=3", "strategy.min_evaluate_nodes=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """One server and its merchants in a temp dir; every process started here is ended in close()."""

    def __init__(self, root: Path, shards: Path, extra: list[str], host: str = "127.0.0.1",
                 netns: dict[str, str] | None = None) -> None:
        self.root = root
        self.shards = shards
        self.host = host
        self.netns = netns or {}
        self.fleet, self.api, self.health = free_port(), free_port(), free_port()
        self.extra = [*extra, f"deploy.fleet_port={self.fleet}", f"deploy.api_port={self.api}",
                      f"deploy.health_port={self.health}", f"deploy.host={host}",
                      f"deploy.superlink={host}:{self.fleet}"]
        self.server: subprocess.Popen[str] | None = None
        self.merchants: dict[int, subprocess.Popen[str]] = {}
        self.run_dir = root / "server"

    def _popen(self, args: list[str], log: Path, where: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("FLWR_HOME", None)
        prefix = ["ip", "netns", "exec", self.netns[where]] if where in self.netns else []
        with log.open("a") as f:
            return subprocess.Popen([*prefix, sys.executable, "-m", *args], cwd=self.root, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def start_server(self, *more: str, wait_ready: bool = True) -> subprocess.Popen[str]:
        mark = len(self.log("server", full=True))
        self.server = self._popen(["server", *BASE, *self.extra, f"hydra.run.dir={self.run_dir}", *more],
                                  self.root / "server.out", "server")
        deadline = time.time() + 120
        while wait_ready and "server ready" not in self.log("server", full=True)[mark:]:
            if self.server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server never became ready:\n{self.log('server')}")
            time.sleep(0.3)
        return self.server

    def start_merchant(self, i: int, *more: str, shard: Path | None = None) -> subprocess.Popen[str]:
        port = free_port()
        args = ["client", *BASE, *self.extra, f"deploy.shard={shard or self.shards / f'merchant_{i:02d}.parquet'}",
                f"deploy.merchant_index={i}", f"deploy.node_port={port}", f"hydra.run.dir={self.root}/m{i}", *more]
        self.merchants[i] = self._popen(args, self.root / f"m{i}.out", "merchants")
        return self.merchants[i]

    def results(self) -> dict[str, Any]:
        path = self.run_dir / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def wait_server(self, timeout: float = 420) -> int:
        assert self.server is not None
        try:
            return self.server.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"server did not finish in {timeout}s:\n{self.log('server')}") from exc

    def wait_round(self, rnd: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(r["round"] >= rnd for r in self.results().get("rounds", [])):
                return
            time.sleep(0.5)
        raise AssertionError(f"round {rnd} never completed:\n{self.log('server')}")

    def log(self, name: str, full: bool = False) -> str:
        path = self.root / f"{name}.out"
        text = path.read_text() if path.is_file() else ""
        return text if full else text[-4000:]

    def kill_server_hard(self) -> None:
        """SIGKILL the server launcher and its SuperLink (everything of the server side), as a crash would."""
        assert self.server is not None
        pid_file = self.run_dir / "superlink.pid"
        _kill_group(self.server.pid, signal.SIGKILL)
        if pid_file.is_file():
            _kill_group(int(pid_file.read_text()), signal.SIGKILL)
        self.server.wait(timeout=30)

    def kill_merchant_hard(self, i: int) -> None:
        """SIGKILL a merchant launcher, its SuperNode and its task executor, as a machine dying would."""
        _kill_group(self.merchants[i].pid, signal.SIGKILL)
        for name in ("supernode.pid", "executor.pid"):
            pid_file = self.root / f"m{i}" / name
            if pid_file.is_file():
                _kill_group(int(pid_file.read_text()), signal.SIGKILL)
        self.merchants[i].wait(timeout=30)

    def close(self) -> None:
        procs = [p for p in [self.server, *self.merchants.values()] if p is not None]
        for p in procs:
            _kill_group(p.pid, signal.SIGTERM)
        pid_file = self.run_dir / "superlink.pid"
        deadline = time.time() + 25
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            _kill_group(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for leftover in [pid_file, *self.root.glob("m*/supernode.pid"), *self.root.glob("m*/executor.pid")]:
            if leftover.is_file():
                _kill_group(int(leftover.read_text()), signal.SIGKILL)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
