"""`python -m simulation [overrides]`: compose conf/ with Hydra and run K virtual merchants (or a baseline)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from common.run.env import set_offline

set_offline()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from common.run import logs  # noqa: E402
from common.run.config import FedshopConfig  # noqa: E402
from common.run.errors import FedshopError  # noqa: E402
from common.run.results import final_line, objective  # noqa: E402

log = logging.getLogger("fedshop")


def run(cfg_raw: DictConfig, run_dir: Path) -> dict[str, float]:
    """Validate config and data up front, then run the configured mode; returns final test metrics."""
    from common.run.config import to_typed
    from common.tasks import data as D
    from common.tasks import model as M

    cfg = to_typed(cfg_raw)
    set_offline(run_dir)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    fd = D.prepare(cfg)
    M.resolve_path(cfg.model)
    sizes = fd.shards.sizes()  # every shard split once: an empty one stops the run here
    shown = "/".join(map(str, sizes)) if len(sizes) <= 20 else f"{min(sizes)}-{max(sizes)}, {sum(sizes)} in all"
    log.info("%s: %d merchants (%s train examples), %d test examples, labels %s", cfg.mode, len(fd.names), shown,
             len(fd.test), fd.labels)
    if cfg.mode == "centralized":
        from simulation.baselines import run_centralized

        final = run_centralized(cfg, run_dir)
    elif cfg.mode == "alone":
        from simulation.baselines import run_alone

        final = run_alone(cfg, run_dir)
    else:
        from simulation.ray_runtime import lock_down

        lock_down(cfg.simulation)  # before anything imports Ray
        _federate(cfg, run_dir, fd.names, sizes)
        final = json.loads((run_dir / "results.json").read_text())["final"]
    log.info("final test metrics: %s", final_line(final))
    log.info("run directory: %s", run_dir)
    return final


def _federate(cfg: FedshopConfig, run_dir: Path, names: list[str], sizes: list[int]) -> None:
    """K virtual merchants in Flower's simulation engine, on the Ray that simulation.ray_address says; the
    server knows them from `names` and `sizes` (by partition) rather than by asking every node."""
    import torch
    from flwr.simulation import run_simulation

    from client.client_app import build_client_app
    from server.flower_patches import record_simulated_nodes
    from server.grid import Roster
    from server.server_app import build_server_app
    from simulation.ray_runtime import started

    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with started(cfg.simulation, torch.cuda.device_count()) as ray_line:
        log.info("%s", ray_line)
        # Flower's RayBackend uses the initialised Ray as it is (its init_args would only apply to a Ray of its own)
        roster = Roster(record_simulated_nodes(), names, sizes)
        # Merchants' lines (one per message) and their warnings: <run dir>/merchants.log, not the console
        run_simulation(server_app=build_server_app(cfg, run_dir, roster),
                       client_app=build_client_app(cfg, run_dir / "merchants.log"),
                       num_supernodes=cfg.simulation.num_merchants,
                       backend_config={"client_resources": {"num_cpus": cfg.simulation.client_cpus,
                                                            "num_gpus": cfg.simulation.client_gpus}})


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg_raw: DictConfig) -> float:
    """Hydra entry point; a user-fixable error prints one line and exits with status 2."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logs.warnings_to_log()
    try:
        final = run(cfg_raw, run_dir)
    except FedshopError as exc:
        print(f"fedshop: error: {exc}", file=sys.stderr)
        logging.getLogger("fedshop").error("%s", exc)
        sys.exit(2)
    return objective(final, cfg_raw.objective)


if __name__ == "__main__":
    main()
