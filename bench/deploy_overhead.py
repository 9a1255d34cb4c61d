"""Fixed per-round cost of deployment (real server + merchant processes over gRPC) beside simulation.

Fixed overhead of a round = its wall time minus the slowest merchant's local training time (rounds 2..;
round 1 includes start-up; the last round also carries the final federated evaluation message). One
run measures, with the same config (tiny model, 3 merchants on 127.0.0.1):
  - simulation;
  - deployment as fedshop ships it: a resident worker per merchant (forked from a warm fork server), arrays
    packed for the trip, 0.2 s polling, evaluation riding on training;
  - the same with a freshly forked process per message (deploy.executor=forkserver);
  - the same with a separate evaluation message per round (strategy.evaluate_with_train=false);
  - the same with Flower's stock executor (a cold flwr-clientapp process per message);
  - Flower's stock flow: stock executor, separate evaluation messages, Flower's 3 s polling.
Usage: python bench/deploy_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _util import ROOT, run_simulation, table, write

sys.path.insert(0, str(ROOT))
from tests.deploy_helpers import BASE, Deployment  # noqa: E402


def overheads(results: dict[str, Any]) -> list[float]:
    """Round seconds minus the slowest reply's training seconds, rounds 2.. (round 1 includes start-up)."""
    out = []
    for r in results["rounds"][2:]:
        train = max((x.get("train_seconds") or 0.0) for x in r["replied"]) if r["replied"] else 0.0
        out.append(r["seconds"] - train)
    return out


SEPARATE = "strategy.evaluate_with_train=false"


def deploy(rounds: int, poll: float, executor: str, *more: str) -> dict[str, Any]:
    """One insecure deployment of three merchants on 127.0.0.1; returns results.json and wall time."""
    root = Path(tempfile.mkdtemp(prefix="fedshop-deploy-bench-"))
    from tests.conftest import run_cli

    shards = root / "shards"
    assert run_cli("simulation.export_shards", [str(shards), *BASE], root).returncode == 0
    d = Deployment(root, shards, ["deploy.insecure=true", f"strategy.num_rounds={rounds}",
                                  f"deploy.poll_interval={poll}", f"deploy.executor={executor}", *more])
    t0 = time.perf_counter()
    try:
        d.start_server()
        for i in range(3):
            d.start_merchant(i)
        if d.wait_server(timeout=1800) != 0:
            raise RuntimeError(d.log("server"))
        return {"results": d.results(), "wall_seconds": time.perf_counter() - t0}
    finally:
        d.close()


def main() -> None:
    """Measure and print the three settings side by side."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    runs = {"simulation": run_simulation([*BASE, f"strategy.num_rounds={a.rounds}"]),
            "deployment (fedshop: resident worker, eval with train, poll 0.2 s)": deploy(a.rounds, 0.2, "resident"),
            "deployment, a forked process per message": deploy(a.rounds, 0.2, "forkserver"),
            "deployment, separate eval messages": deploy(a.rounds, 0.2, "forkserver", SEPARATE),
            "deployment, Flower executor": deploy(a.rounds, 0.2, "subprocess"),
            "deployment, Flower stock (executor, separate eval, poll 3 s)": deploy(a.rounds, 3.0, "subprocess",
                                                                                  SEPARATE)}
    rows = []
    for name, run in runs.items():
        ov = overheads(run["results"])
        secs = [r["seconds"] for r in run["results"]["rounds"][2:]]
        rows.append({"setting": name, "round_s_median": statistics.median(secs),
                     "fixed_overhead_s_median": statistics.median(ov), "fixed_overhead_s_mean": statistics.mean(ov),
                     "wall_s": run["wall_seconds"]})
    base = rows[0]["fixed_overhead_s_median"]
    for row in rows:
        row["overhead_vs_simulation"] = row["fixed_overhead_s_median"] / base if base > 0 else float("nan")
    print(table(rows, ["setting", "round_s_median", "fixed_overhead_s_median", "fixed_overhead_s_mean",
                       "overhead_vs_simulation", "wall_s"]))
    print("target: fixed overhead <= 2 s per deployed round with LoRA (bench/peft.py --deploy); this table: full")
    print("written:", write("deploy_overhead", {"rounds": a.rounds, "rows": rows,
                                                "per_round": {k: v["results"]["rounds"] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
