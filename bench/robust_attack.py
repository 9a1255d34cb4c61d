"""One attacker among 10 merchants: final accuracy / nDCG@10 for FedAvg and each robust option.

The attacker (merchant 0) sends theta - 10 * (its honest update) every round (sign flip, scaled). Every
strategy also runs without the attacker: what the robust options cost when nobody attacks.
Writes bench/results/robust_attack.json.
Usage: python bench/robust_attack.py [--rounds 3] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
from typing import Any

from _util import run_simulation, table, write

STRATEGIES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]


def main() -> None:
    """Each strategy without, then with the attacker; print and write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = [f"strategy.num_rounds={a.rounds}", f"simulation.num_merchants={a.merchants}", "train.progress=false",
            *a.overrides]
    attack = ["simulation.attackers=[0]", "simulation.attack=sign_flip", f"simulation.attack_scale={a.scale}"]
    rows: list[dict[str, Any]] = []
    for name, args in [*[(f"{s}, no attacker", [f"strategy={s}"]) for s in STRATEGIES],
                       *[(f"{s}, 1 attacker", [f"strategy={s}", *attack]) for s in STRATEGIES]]:
        out = run_simulation([*base, *args])
        final = out["results"]["final"]
        rows.append({"setting": name, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
                     "ndcg@10": final["ndcg@10"], "seconds": out["wall_seconds"]})
        print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    print("written:", write("robust_attack", {"overrides": base, "attack": attack, "rows": rows}))


if __name__ == "__main__":
    main()
