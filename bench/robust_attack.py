"""One attacker among 10 merchants: final accuracy / nDCG@10 for FedAvg and each robust option.

The attacker (merchant 0) sends theta - 10 * (its honest update) every round (sign flip, scaled). Every
strategy also runs without the attacker: what the robust options cost when nobody attacks.
Writes bench/results/robust_attack.json.
Usage: python bench/robust_attack.py [--rounds N] [--strategies fedavg,fedmedian,...] [extra Hydra overrides...]
(--rounds defaults to the configured strategy.num_rounds: the main job's recipe.)
"""

from __future__ import annotations

import argparse
from typing import Any

from _util import run_simulation, table, write

STRATEGIES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]


def main() -> None:
    """Each strategy without, then with the attacker; print and write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rounds = [f"strategy.num_rounds={a.rounds}"] if a.rounds else []
    base = ["task=relevance", *rounds, f"simulation.num_merchants={a.merchants}", "train.progress=false", *a.overrides]
    chosen = a.strategies.split(",")
    attack = ["simulation.attackers=[0]", "simulation.attack=sign_flip", f"simulation.attack_scale={a.scale}"]
    rows: list[dict[str, Any]] = []
    for name, args in [*[(f"{s}, no attacker", [f"strategy={s}"]) for s in chosen],
                       *[(f"{s}, 1 attacker", [f"strategy={s}", *attack]) for s in chosen]]:
        out = run_simulation([*base, *args])
        final = out["results"]["final"]
        rows.append({"setting": name, **{k: final.get(k) for k in ("accuracy", "macro_f1", "ndcg@10",
                                                                   "catalog_ndcg@10")},
                     "recall": final.get("recall"), "seconds": out["wall_seconds"]})
        print(rows[-1], flush=True)
    print(table(rows, ["setting", "accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "seconds"]))
    clean = {r["setting"].split(",")[0]: r for r in rows if r["setting"].endswith("no attacker")}
    if "fedavg" in clean:
        print("clean cost against fedavg (accuracy points):",
              {k: round(100 * (clean["fedavg"]["accuracy"] - v["accuracy"]), 1) for k, v in clean.items()})
    print("written:", write("robust_attack", {"overrides": base, "attack": attack, "rows": rows}))


if __name__ == "__main__":
    main()
