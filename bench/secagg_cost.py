"""Cost of SecAgg+ per round beside plain FedAvg: seconds and bytes, measured side by side in one run.

Each setting runs twice with the same config and seeds, plain (secagg=none) and secagg=plus:
  - simulation, tiny model, 3 and 8 merchants (every merchant every round, num_shares = all of them);
  - deployment (server + 3 merchant processes over gRPC on 127.0.0.1), tiny model;
  - simulation, MiniLM (22.7M parameters), 3 merchants.
Per round (rounds 2..; round 1 includes start-up): wall seconds, the slowest merchant's training seconds,
and payload bytes (array data, config bytes, 8 per number) up and down per merchant; for SecAgg+ also the
seconds of each protocol stage. Writes bench/results/secagg_cost.json.
Usage: python bench/secagg_cost.py [--rounds 3] [--skip-minilm] [--skip-deploy]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _util import run_simulation, table, write
from deploy_overhead import deploy

from tests.deploy_helpers import BASE

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def per_round(results: dict[str, Any]) -> dict[str, float]:
    """Medians over rounds 2.. of round seconds, training seconds and bytes per sampled merchant."""
    rounds = results["rounds"][2:]
    out = {"round_s": statistics.median(r["seconds"] for r in rounds),
           "train_s": statistics.median(max((x.get("train_seconds") or 0.0) for x in r["replied"]) for r in rounds),
           "up_MB": statistics.median(r["bytes_up_total"] / len(r["sampled"]) for r in rounds) / 1e6,
           "down_MB": statistics.median(r["bytes_down_total"] / len(r["sampled"]) for r in rounds) / 1e6}
    if "secure_aggregation" in rounds[0]:
        for stage in STAGES:
            out[f"{stage}_s"] = statistics.median(next(s["seconds"] for s in r["secure_aggregation"]["stages"]
                                                       if s["stage"] == stage) for r in rounds)
    return out


def main() -> None:
    """Run every setting plain and with SecAgg+; print the table and write JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-deploy", action="store_true")
    a = ap.parse_args()
    rounds = [f"strategy.num_rounds={a.rounds}"]
    eight = ["simulation.num_merchants=8", "strategy.min_available_nodes=8", "strategy.min_train_nodes=8",
             "strategy.min_evaluate_nodes=8"]
    minilm = ["model=minilm", "train.progress=false", "train.local_epochs=1", "simulation.num_merchants=3",
              "data.synthetic.num_queries=60", "train.num_threads=2"]
    settings: dict[str, Any] = {
        "simulation, tiny, 3 merchants": lambda extra: run_simulation([*BASE, *rounds, *extra])["results"],
        "simulation, tiny, 8 merchants": lambda extra: run_simulation([*BASE, *rounds, *eight, *extra])["results"],
    }
    if not a.skip_deploy:
        settings["deployment, tiny, 3 merchants"] = lambda extra: deploy(a.rounds, 0.2, "forkserver", *extra)["results"]
    if not a.skip_minilm:
        settings["simulation, MiniLM, 3 merchants"] = lambda extra: run_simulation([*minilm, *rounds,
                                                                                      *extra])["results"]
    rows, raw = [], {}
    for name, run in settings.items():
        plain, secure = run([]), run(["secagg=plus"])
        raw[name] = {"plain": plain["rounds"], "secagg": secure["rounds"]}
        p, s = per_round(plain), per_round(secure)
        row = {"setting": name, "plain_round_s": p["round_s"], "secagg_round_s": s["round_s"],
               "extra_s": s["round_s"] - p["round_s"], "time_ratio": s["round_s"] / p["round_s"],
               "plain_up_MB": p["up_MB"], "secagg_up_MB": s["up_MB"], "bytes_up_ratio": s["up_MB"] / p["up_MB"],
               "plain_down_MB": p["down_MB"], "secagg_down_MB": s["down_MB"],
               "accuracy_plain": plain["final"]["accuracy"], "accuracy_secagg": secure["final"]["accuracy"],
               **{f"secagg_{k}": v for k, v in s.items() if k.endswith("_s") and k != "round_s"}}
        rows.append(row)
        print(table([row], list(row)), flush=True)
    cols = ["setting", "plain_round_s", "secagg_round_s", "extra_s", "time_ratio", "plain_up_MB", "secagg_up_MB",
            "bytes_up_ratio", "plain_down_MB", "secagg_down_MB", "accuracy_plain", "accuracy_secagg"]
    print(table(rows, cols))
    print(table(rows, ["setting", *[f"secagg_{s}_s" for s in STAGES], "secagg_train_s"]))
    print("written:", write("secagg_cost", {"rounds": a.rounds, "rows": rows, "per_round": raw}))


if __name__ == "__main__":
    main()
