"""Privacy-utility curve: final accuracy / nDCG@10 at epsilon in {inf, 8, 4, 2, 1} (delta = 1e-5).

Central DP (server-side fixed clipping) on the default data and model, 10 merchants, every merchant every
round (no sampling amplification). For each epsilon, the noise multiplier z is the smallest that keeps
`rounds` rounds within it (found with the run's own accountant). The clipping norm C is the median update
norm of the non-private run (recorded in its results.json), so clipping alone costs little and the curve
shows the noise. Writes bench/results/privacy_utility.json and privacy_utility.png.
Usage: python bench/privacy_utility.py [--rounds 3] [--epsilons 8 4 2 1] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _util import RESULTS, run_simulation, table, write

from common.config import compose
from server.privacy import Ledger


def noise_for(epsilon: float, rounds: int, population: int) -> float:
    """Smallest noise multiplier (to 1e-3) whose `rounds` releases stay within epsilon at delta 1e-5."""
    lo, hi = 0.05, 200.0
    while hi - lo > 1e-3:
        z = (lo + hi) / 2
        ledger = Ledger(compose(["privacy=central", f"privacy.noise_multiplier={z}"]).privacy, population,
                        population)
        for _ in range(rounds):
            ledger.compose()
        lo, hi = (z, hi) if ledger.spent()["epsilon"] > epsilon else (lo, z)
    return hi


def main() -> None:
    """Run the non-private reference, then one central-DP run per epsilon; print, plot and write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = [f"strategy.num_rounds={a.rounds}", f"simulation.num_merchants={a.merchants}", "train.progress=false",
            *a.overrides]
    reference = run_simulation(base)
    norms = [r["update_norm"] for rnd in reference["results"]["rounds"][1:] for r in rnd["replied"]]
    clip = statistics.median(norms)
    final = reference["results"]["final"]
    rows: list[dict[str, Any]] = [{"epsilon": "inf", "noise_multiplier": 0.0, "clipping_norm": None,
                                   "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
                                   "ndcg@10": final["ndcg@10"], "epsilon_spent": None,
                                   "seconds": reference["wall_seconds"]}]
    print(f"no DP: {final}; median update norm {clip:.4f} (min {min(norms):.4f}, max {max(norms):.4f})",
          flush=True)
    for eps in a.epsilons:
        z = noise_for(eps, a.rounds, a.merchants)
        out = run_simulation([*base, "privacy=central", f"privacy.noise_multiplier={z}",
                              f"privacy.clipping_norm={clip}", f"privacy.target_epsilon={eps}"])
        res = out["results"]
        rows.append({"epsilon": eps, "noise_multiplier": z, "clipping_norm": clip,
                     "accuracy": res["final"]["accuracy"], "macro_f1": res["final"]["macro_f1"],
                     "ndcg@10": res["final"]["ndcg@10"], "epsilon_spent": res["privacy"]["epsilon"],
                     "seconds": out["wall_seconds"]})
        print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    private = rows[1:]
    ax.plot([r["epsilon"] for r in private], [r["accuracy"] for r in private], "o-", label="central DP")
    ax.axhline(rows[0]["accuracy"], color="grey", ls="--", label="no DP (epsilon = inf)")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{a.merchants} merchants, {a.rounds} rounds")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "privacy_utility.png", dpi=120)
    print("written:", write("privacy_utility", {"overrides": base, "delta": 1e-5, "rows": rows,
                                                "update_norms": norms}), RESULTS / "privacy_utility.png")


if __name__ == "__main__":
    main()
