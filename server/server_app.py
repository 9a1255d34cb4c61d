"""Flower ServerApp: thin glue that hands the Grid to the round loop in server.federation."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.run.config import FedshopConfig, from_run_config
from server.federation import run_federated
from server.grid import Roster


def build_server_app(fixed_cfg: FedshopConfig | None = None, run_dir: Path | None = None,
                     roster: Roster | None = None) -> ServerApp:
    """A ServerApp; with `fixed_cfg` (simulation) it ignores the run config, else reads it from the run; with a
    roster (a simulation's launcher) it knows its merchants without asking them."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not logging.getLogger().handlers:  # a deployed ServerApp process: round lines to the run's log stream
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            for name in ("common", "server", "client"):
                logging.getLogger(name).setLevel(logging.INFO)
                logging.getLogger(name).addHandler(handler)
        cfg = fixed_cfg or from_run_config(dict(context.run_config))
        out = run_dir or Path(str(context.run_config.get("run-dir") or f"outputs/flwr-run-{context.run_id}"))
        run_federated(grid, cfg, out.resolve(), roster)

    return app


app = build_server_app()
