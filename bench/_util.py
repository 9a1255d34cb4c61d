"""Helpers shared by the benchmarks: run the launcher, read results, print a table, write JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The scripts' own folder leaves the import path once this module is in: bench/peft.py would otherwise stand in for
# the peft package that transformers imports.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from common.run.env import OFFLINE  # noqa: E402


def run_simulation(args: list[str], workdir: Path | None = None, sample_rss: bool = False) -> dict[str, Any]:
    """Run `python -m simulation args` in a fresh directory; returns results.json, wall seconds, peak RSS and the
    run directory."""
    cwd = workdir or Path(tempfile.mkdtemp(prefix="fedshop-bench-"))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "simulation", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True) if sample_rss else None
    if sampler:
        sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"simulation {' '.join(args)} failed:\n{out[-4000:]}")
    found = next(cwd.glob("outputs/*/*/results.json"))
    return {"results": json.loads(found.read_text()), "wall_seconds": wall, "peak_rss_bytes": peak[0], "log": out,
            "run_dir": found.parent}


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A Markdown table of rows (floats with 4 decimals)."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, doc: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
