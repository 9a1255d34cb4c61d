"""The Ray under a simulation: one that fedshop starts (loopback only, token authentication), or a cluster it joins.

Why the environment and not ray.init's arguments (Ray 2.55.1, measured; ../shared/FLOWER-NOTES.md):
- `ray.init(_node_ip_address="127.0.0.1")` is not loopback: ray.init turns 127.0.0.1 into the machine's address
  (services.resolve_ip_for_localhost) and gcs_server, raylet and every worker then listen on `*:<port>`.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray a single-machine Ray: its node address is loopback and every server
  binds 127.0.0.1 (what Ray does on laptops). Its only other effect is that no second node can join, which a Ray
  fedshop starts for itself never needs.
- RAY_AUTH_MODE=token makes every Ray gRPC server refuse a call without the token (Ray 2.52+). Ray reads the mode
  once, when `ray` is imported: set later, the driver cannot talk to its own GCS. So `lock_down` runs before
  anything imports Ray, and refuses to run after.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from common.run.config import SimulationConfig
from common.run.env import OFFLINE
from common.run.errors import FedshopError

log = logging.getLogger("fedshop")

LOCKED = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray's own order; ~/.ray/auth_token is never written


def lock_down(sim: SimulationConfig) -> None:
    """Before Ray is imported: the Ray this run starts binds loopback and wants a token (a fresh one unless the
    user set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH). Joining a cluster changes nothing: its owner chose."""
    if sim.ray_address:
        return
    if "ray" in sys.modules and any(os.environ.get(k) != v for k, v in LOCKED.items()):
        raise RuntimeError("simulation.ray_runtime.lock_down must run before `ray` is imported (Ray reads "
                           "RAY_AUTH_MODE once, at import)")
    os.environ.update(LOCKED)
    if not any(os.environ.get(k) for k in TOKEN_SOURCES):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def worker_env() -> dict[str, str]:
    """What every Ray worker needs, on this machine or another node: fedshop importable, and offline."""
    env = {k: os.environ[k] for k in OFFLINE if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@contextmanager
def started(sim: SimulationConfig, num_gpus: int) -> Iterator[str]:
    """Ray initialised for Flower's backend (which takes an initialised Ray as it is); yields a one-line
    description. A Ray fedshop started is stopped after; a joined cluster is only disconnected from."""
    import ray

    runtime_env = {"env_vars": worker_env()}
    if sim.ray_address:
        _join(sim.ray_address, runtime_env)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        what = (f"joined Ray cluster {sim.ray_address}: {len(nodes)} nodes, {res.get('CPU', 0):g} CPUs, "
                f"{res.get('GPU', 0):g} GPUs")
    else:
        info = ray.init(num_cpus=os.cpu_count() or 1, num_gpus=num_gpus, include_dashboard=sim.dashboard,
                        dashboard_host="127.0.0.1", runtime_env=runtime_env, logging_level=logging.ERROR)
        what = "Ray on 127.0.0.1 only, token authentication" + (
            f", dashboard http://{info.dashboard_url}" if sim.dashboard else "")
    try:
        yield what
    finally:
        ray.shutdown()


def _join(address: str, runtime_env: dict[str, dict[str, str]]) -> None:
    """ray.init(address) with errors that say what to set."""
    import ray

    if os.environ.get("RAY_AUTH_MODE") != "token":
        log.warning("simulation.ray_address=%s: joined without token authentication (RAY_AUTH_MODE is not 'token'); "
                    "a Ray cluster that anyone on its network can reach runs anyone's code (CVE-2023-48022)", address)
    _reachable(address)
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.ERROR)
    except (ray.exceptions.AuthenticationError, ConnectionError) as exc:
        # Ray 2.55 reports a wrong token as a ConnectionError after ~20 s of retries, like an absent cluster.
        raise FedshopError(f"simulation.ray_address={address}: could not join the Ray cluster ({exc}); is it "
                           f"running there, and does this driver have its token (RAY_AUTH_MODE=token and "
                           f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)?") from exc


def _reachable(address: str) -> None:
    """Fail at once when nothing listens at host:port (ray.init would retry for minutes); "auto" is Ray's."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise FedshopError(f"simulation.ray_address={address}: no Ray cluster listens there ({exc}); start one "
                           f"with `ray start --head --port={port}` or fix the address") from exc
