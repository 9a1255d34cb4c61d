"""Shared fixtures: offline environment, tiny configs, subprocess runner for the launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.env import OFFLINE, set_offline

ROOT = Path(__file__).resolve().parent.parent
set_offline()

# Fast settings for the tiny random-init model on the built-in review data (learnable in seconds).
TINY = ["model=tiny", "train.progress=false", "train.lr=1e-3", "train.warmup_ratio=0.0", "train.local_epochs=2"]
TINY_REVIEWS = [*TINY, "data=synthetic_reviews", "data.synthetic.num_reviews=1200"]


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` in cwd with the offline environment; output captured."""
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    env.pop("FLWR_HOME", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def tiny_cfg():
    """A composed, validated config for the tiny model on the review data (3 merchants)."""
    from common.config import compose

    return compose([*TINY_REVIEWS, "simulation.num_merchants=3"])
