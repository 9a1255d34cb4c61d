"""Environment that keeps every run offline and Flower's state inside the run directory."""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Library progress bars (partitioning, weight saving) off; fedshop's own bars pass `disable` explicitly.
    "TQDM_DISABLE": "1",
}


def set_offline(run_dir: Path | None = None) -> None:
    """Set the offline variables (never overriding the user's) and FLWR_HOME=<run_dir>/flwr."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    if run_dir is not None:
        home = run_dir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(home)
