"""The repository is a Flower app: `flwr run .` against Flower's local simulation runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.env import OFFLINE
from tests.conftest import ROOT


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


@pytest.mark.slow
def test_flwr_run_dot(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    overrides = "model=tiny finetune=lora simulation.num_merchants=2 strategy.num_rounds=2 train.progress=false"
    try:
        proc = subprocess.run(["flwr", "run", ".", "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"',
                               "--stream"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
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
