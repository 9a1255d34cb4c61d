"""Peak RSS (the launcher and every process it starts, Ray included) of a simulation with K merchants.

Tiny model, IID shards of the same data for every K (the marketplace generator's 10 merchants' 4,000 queries,
about 20,000 training pairs, split over K), 10 merchants sampled per round, 2 rounds.
Usage: python bench/memory.py [--ks 10 100 1000 10000]
"""

from __future__ import annotations

import argparse

from _util import run_simulation, table, write


def main() -> None:
    """Run one simulation per K and report peak RSS and wall time."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--sampled", type=int, default=10)
    a = ap.parse_args()
    rows = []
    for k in a.ks:
        args = ["task=relevance", "model=tiny",
                "partition=iid", f"simulation.num_merchants={k}", "strategy.num_rounds=2",
                f"strategy.fraction_train={a.sampled / k}", f"strategy.min_train_nodes={min(a.sampled, k)}",
                "strategy.fraction_evaluate=0.0", "strategy.min_available_nodes=2", "data.val_fraction=0.0",
                "data.synthetic.num_merchants=10",
                "data.synthetic.num_queries=4000", "train.progress=false", "train.local_epochs=1"]
        out = run_simulation(args, sample_rss=True)
        rounds = out["results"]["rounds"]
        rows.append({"K": k, "sampled_per_round": len(rounds[-1]["sampled"]), "round_s": [r["seconds"] for r in rounds],
                     "peak_rss_MiB": out["peak_rss_bytes"] / 2**20, "wall_s": out["wall_seconds"],
                     "final_accuracy": out["results"]["final"]["accuracy"]})
        print(rows[-1], flush=True)
    print(table(rows, ["K", "sampled_per_round", "peak_rss_MiB", "wall_s", "final_accuracy"]))
    base = rows[0]["peak_rss_MiB"]
    for r in rows:
        print(f"K={r['K']}: peak RSS {r['peak_rss_MiB']:.0f} MiB = {r['peak_rss_MiB'] / base:.2f}x K={rows[0]['K']}")
    print("written:", write("memory", {"rows": rows}))


if __name__ == "__main__":
    main()
