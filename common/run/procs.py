"""Starting and stopping the Flower processes a launcher owns (each in its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.run.env import OFFLINE


def flower_env(run_dir: Path) -> dict[str, str]:
    """Environment for Flower processes: offline, FLWR_HOME in the run dir, this interpreter's bin first."""
    home = run_dir / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **OFFLINE, "FLWR_HOME": str(home), "PATH": path, "PYTHONUNBUFFERED": "1"}


def start(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start cmd in a new session (so stop() can end all it spawns), output appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send sig to the process group of proc, if it still exists."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it; reaps the leader."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """True once host:port accepts TCP connections; False on timeout or when proc exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (for error messages)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
