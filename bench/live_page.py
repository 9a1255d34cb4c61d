"""The live federation page during a real run: its picture for the README, and what serving it costs.

Runs a 5-round tiny-model simulation (4 merchants, the built-in relevance data) with the page on; while it runs,
times /status and the page over HTTP, and once round 2 is done loads the page in headless Chromium and saves
bench/results/live_page.png. Also runs the same simulation with live.port=null and prints the two runs' median
round seconds side by side. Writes bench/results/live_page.json.
Usage: python bench/live_page.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _util import RESULTS, ROOT, run_simulation, table, write

from common.run.env import OFFLINE
from tests.browser import Browser
from tests.deploy_helpers import free_port

ARGS = ["task=relevance",
        "model=tiny", "finetune=full", "train.progress=false", "train.lr=1e-3", "train.warmup_ratio=0.0",
        "simulation.num_merchants=4", "strategy.num_rounds=5"]


def _get(url: str) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read()
    return body, time.perf_counter() - t0


def _status(url: str) -> dict[str, Any]:
    return dict(json.loads(_get(url + "status")[0]))


def with_page(workdir: Path) -> dict[str, Any]:
    """The run with its page: HTTP timings while it runs, the screenshot, and its results."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "simulation", *ARGS, f"live.port={port}",
                             f"hydra.run.dir={workdir / 'run'}"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    status_s: list[float] = []
    page_s: list[float] = []
    try:
        while True:
            try:
                if _status(url).get("rounds_done", 0) >= 2:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "the run ended before round 2"
            time.sleep(0.5)
        for _ in range(50):
            status_s.append(_get(url + "status")[1])
            page_s.append(_get(url)[1])
        browser = Browser(url, width=1000, height=640)
        try:
            browser.wait_for("document.querySelectorAll('#chart polyline').length >= 3")
            shown = browser.js("document.getElementById('round').textContent")
            time.sleep(1.5)  # one more poll, so the ETA and counts are the current ones
            browser.screenshot(RESULTS / "live_page.png")
        finally:
            browser.close()
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = json.loads((workdir / "run" / "results.json").read_text())
    return {"results": results, "round_shown": shown, "status_ms": 1000 * statistics.median(status_s),
            "page_ms": 1000 * statistics.median(page_s)}


def main() -> None:
    """Run both, print the table, write the JSON."""
    live = with_page(Path(tempfile.mkdtemp(prefix="fedshop-bench-live-")))
    plain = run_simulation([*ARGS, "live.port=null"])
    rows = []
    for setting, results in (("live.port=null", plain["results"]), ("live page on", live["results"])):
        rows.append({"setting": setting, "round_s": statistics.median(r["seconds"] for r in results["rounds"][2:]),
                     "accuracy": results["final"]["accuracy"]})
    rows[1].update({"status_ms": live["status_ms"], "page_ms": live["page_ms"]})
    rows[1]["round_ratio"] = rows[1]["round_s"] / rows[0]["round_s"]
    print(table(rows, ["setting", "round_s", "accuracy", "status_ms", "page_ms", "round_ratio"]))
    write("live_page", {"args": ARGS, "rows": rows, "round_shown": live["round_shown"],
                        "screenshot": "bench/results/live_page.png"})


if __name__ == "__main__":
    main()
