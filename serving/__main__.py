"""`python -m serving serving.model_dir=DIR serving.catalog=FILE [overrides]`: the real-time ranking service.

Everything is loaded, validated and warmed up before the port opens, so the service never answers from a
half-loaded model; a bad model directory or catalog is one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.run.env import set_offline

set_offline()


from common.run.cli import hydra_launcher  # noqa: E402
from common.run.config import FedshopConfig  # noqa: E402

log = logging.getLogger("fedshop.serving")


def serve(cfg: FedshopConfig, run_dir: Path) -> int:
    """Load the service, then run uvicorn on serving.host:serving.port until stopped."""
    import uvicorn
    from threadpoolctl import threadpool_limits

    from serving.app import create_app, load_service

    # One BLAS thread: a query's dot product with the catalog is small, and OpenBLAS's threads spin between calls,
    # taking the cores from the encoder (measured on 2 cores at concurrency 8: 121 requests/s with them, 324 without).
    threadpool_limits(limits=1, user_api="blas")
    v = cfg.serving
    service = load_service(v)
    m = service.models.describe()
    log.info("serving %s (%s, %s, version %s; second stage %s), catalog %s (%d products, %s retrieval) on "
             "http://%s:%d", v.model_dir, m["model"], m["form"], m["model_version"], m["reranker_version"] or "none",
             v.catalog, len(service.catalog), m["retrieval"], v.host, v.port)
    uvicorn.run(create_app(service), host=v.host, port=v.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    hydra_launcher(serve, log)()
