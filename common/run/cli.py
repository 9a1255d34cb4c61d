"""Shared launcher plumbing: validate the composed config, run, and turn user errors into one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from common.run.config import FedshopConfig, to_typed
from common.run.env import set_offline
from common.run.errors import FedshopError
from common.run.logs import warnings_to_log


def run_guarded(cfg_raw: DictConfig, run_dir: Path, job: Callable[[FedshopConfig, Path], int],
                log: logging.Logger) -> None:
    """Type-check cfg_raw, run job(cfg, run_dir) offline and exit with its status; FedshopError exits 2."""
    warnings_to_log()
    try:
        cfg = to_typed(cfg_raw)
        set_offline(run_dir)
        status = job(cfg, run_dir)
    except FedshopError as exc:
        print(f"fedshop: error: {exc}", file=sys.stderr)
        log.error("%s", exc)
        status = 2
    sys.exit(status)


def hydra_launcher(job: Callable[[FedshopConfig, Path], int], log: logging.Logger) -> Callable[[], None]:
    """A Hydra entry point over conf/ that runs `job` guarded (see run_guarded) in the run directory."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    conf = str(Path(__file__).resolve().parents[2] / "conf")

    @hydra.main(config_path=conf, config_name="config", version_base=None)
    def main(cfg_raw: DictConfig) -> None:
        run_guarded(cfg_raw, Path(HydraConfig.get().runtime.output_dir).resolve(), job, log)

    return main
