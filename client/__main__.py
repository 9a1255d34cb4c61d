"""`python -m client deploy.shard=<file> deploy.merchant_index=<i> [overrides]`: one merchant (a SuperNode).

The shard is validated here before anything connects; its path travels only in this node's config.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from common.run.env import set_offline

set_offline()


from common.protocol import wire  # noqa: E402
from common.run import procs  # noqa: E402
from common.run.cli import hydra_launcher  # noqa: E402
from common.run.config import FedshopConfig  # noqa: E402
from common.run.errors import FedshopError  # noqa: E402

log = logging.getLogger("fedshop.client")
REFUSED = {"Failed to activate SuperNode": "the server refused this merchant: its key is not registered there",
           "CERTIFICATE_VERIFY_FAILED": "TLS failed: the server certificate is not signed by deploy.certs/ca.crt",
           "Ssl handshake failed": "TLS handshake with the server failed (wrong CA, or an insecure merchant "
                                   "against a TLS server)"}


def _node_config(cfg: FedshopConfig, shard: str, name: str, lines: Path) -> str:
    """This merchant's node config: its shard, index and name, the file its tasks append a line per message to,
    and its own copy of the base model if any."""
    d = cfg.deploy
    items = {wire.NODE_SHARD: shard, wire.NODE_MERCHANT_INDEX: d.merchant_index, wire.NODE_MERCHANT_NAME: name,
             wire.NODE_LOG: str(lines)}
    if d.model_path:
        items[wire.NODE_MODEL_PATH] = str(Path(d.model_path).expanduser().resolve())
    for key, value in items.items():
        if '"' in str(value):
            raise FedshopError(f"deploy: {key} {value!r} may not contain a double quote")
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in items.items())


def supernode_command(cfg: FedshopConfig, name: str, lines: Path, secret: Path | None = None) -> list[str]:
    """flower-superlink's counterpart for this merchant, every address explicit.

    With `secret` the node runs in process isolation: fedshop's executor (executor_command) runs its tasks
    and both authenticate with that shared secret.
    """
    d = cfg.deploy
    shard = str(Path(str(d.shard)).expanduser().resolve())
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", d.superlink, "--grpc-rere", "--host", "127.0.0.1",
           "--port", str(d.node_port), "--node-config", _node_config(cfg, shard, name, lines), "--max-retries",
           str(d.connect_retries),
           "--max-wait-time", str(d.connect_wait)]
    if secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if d.insecure:
        return [*cmd, "--insecure"]
    certs = Path(d.certs).expanduser().resolve()
    ca = certs / "ca.crt"
    if not ca.is_file():
        raise FedshopError(f"deploy.certs: {ca} not found; copy the server's CA certificate there "
                           f"(or deploy.insecure=true against an insecure server)")
    cmd += ["--root-certificates", str(ca)]
    if d.auth:
        key = Path(d.key).expanduser().resolve() if d.key else certs / "merchants" / f"merchant_{d.merchant_index:02d}"
        if not key.is_file():
            raise FedshopError(f"deploy.key: private key {key} not found (python -m server.certs makes one per "
                               f"merchant; the server must register its .pub)")
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd


def executor_command(cfg: FedshopConfig, node_pid: int, secret: Path) -> list[str]:
    """fedshop's SuperExec for this merchant's node (see client/executor)."""
    return [sys.executable, "-m", "client.executor", "--runtime-api-address", f"127.0.0.1:{cfg.deploy.node_port}",
            "--insecure", "--parent-pid", str(node_pid), "--superexec-auth-secret-file", str(secret),
            *(["--resident"] if cfg.deploy.executor == "resident" else [])]


def _new_secret(run_dir: Path) -> Path:
    """A random secret only this user can read, shared by the SuperNode and its executor."""
    path = run_dir / "superexec.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
    return path


class Tail:
    """The lines this merchant's tasks append to `path` (one per message), shown on the console as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0  # a restarted merchant shows only new lines

    def show(self) -> None:
        """Log the complete lines written since the last call."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        done = chunk.rfind(b"\n") + 1
        self.offset += done
        for line in chunk[:done].decode(errors="replace").splitlines():
            log.info("%s", line.split(" ", 1)[-1])


def run_merchant(cfg: FedshopConfig, run_dir: Path) -> int:
    """Validate the shard, then run the SuperNode until it exits; returns its exit status."""
    from common.tasks import data as D

    d = cfg.deploy
    if not d.shard:
        raise FedshopError("deploy.shard: the path of this merchant's data file is required")
    name = d.merchant_name or f"merchant_{d.merchant_index:02d}"
    train, val, labels = D.load_shard(d.shard, cfg, name)
    log.info("%s: shard %s valid: %d train / %d validation examples, labels %s", name, d.shard, len(train), len(val),
             labels)
    if d.insecure:
        log.warning("deploy.insecure=true: the connection to %s is not encrypted", d.superlink)
    env = procs.flower_env(run_dir)
    env["FEDSHOP_NODE_POLL_INTERVAL"] = str(d.poll_interval)
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(0.01, d.poll_interval / 2))
    log_path = run_dir / "supernode.log"
    secret = _new_secret(run_dir) if d.executor in {"forkserver", "resident"} else None
    lines = Tail(run_dir / "messages.log")
    node = procs.start(supernode_command(cfg, name, lines.path, secret), log_path, env)
    (run_dir / "supernode.pid").write_text(f"{node.pid}\n")
    owned = [node]
    if secret is not None:
        owned.append(procs.start(executor_command(cfg, node.pid, secret), run_dir / "executor.log", env))
        (run_dir / "executor.pid").write_text(f"{owned[1].pid}\n")

    stopped: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        for proc in owned:
            procs.signal_group(proc, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(proc.poll() is None for proc in owned):
        lines.show()
        time.sleep(0.5)
    lines.show()
    executor_died = len(owned) > 1 and owned[1].poll() is not None and node.poll() is None
    for proc in owned:
        procs.stop(proc, grace=20)
    rc = node.returncode
    if stopped:
        log.info("%s: stopped by signal %d", name, stopped[0])
        return 128 + stopped[0]
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    for marker, message in REFUSED.items():
        if marker in text:
            raise FedshopError(f"{name}: {message} (see {log_path})")
    if executor_died:
        raise FedshopError(f"{name}: the task executor exited with status {owned[1].returncode}: "
                           f"{procs.tail(run_dir / 'executor.log', 3)}")
    if rc != 0:
        raise FedshopError(f"{name}: the SuperNode exited with status {rc}: {procs.tail(log_path, 3)}")
    return 0


if __name__ == "__main__":
    hydra_launcher(run_merchant, log)()
