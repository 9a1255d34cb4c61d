"""Privacy-utility curves, side by side from one run: final accuracy, macro-F1 and nDCG@10 against epsilon.

Same data, rounds, merchants and seeds for every row (10 merchants, every merchant every round):
- `none/<finetune>`: no DP (epsilon = inf), LoRA and full fine-tuning.
- `central/lora`: merchant-level DP (server-side fixed clipping). For each epsilon the noise multiplier is the
  smallest that keeps the rounds within it (the run's own accountant); the clipping norm is the median update
  norm of the non-private run, so clipping alone costs little and the curve shows the noise.
- `example/<finetune>`: record-level DP-SGD on every merchant (privacy=example, Opacus), each merchant's noise
  derived from target epsilon at delta = 1e-5 per merchant dataset; `epsilon_spent` is the largest any merchant
  spent.
The majority label's accuracy is the floor a model must clear. Rows are written to
bench/results/privacy_utility.json as they finish (a long run keeps what it has measured); the plot is
bench/results/privacy_utility.png.
Usage: python bench/privacy_utility.py [--rounds 3] [--epochs 1] [--epsilons 8 4 2 1] [--full-epsilons 8 4 2 1]
       [--only central/lora,example/lora,...] [--name privacy_utility] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from typing import Any

from _util import RESULTS, run_simulation, table, write

from common.run.config import compose
from common.tasks import data as D
from server.privacy import Ledger

COLUMNS = ["setting", "target_epsilon", "epsilon_spent", "accuracy", "macro_f1", "ndcg@10", "noise_multiplier",
           "seconds"]


def noise_for(epsilon: float, rounds: int, population: int) -> float:
    """Smallest merchant-level noise multiplier (to 1e-3) whose `rounds` releases stay within epsilon."""
    lo, hi = 0.05, 200.0
    while hi - lo > 1e-3:
        z = (lo + hi) / 2
        ledger = Ledger(compose(["privacy=central", f"privacy.noise_multiplier={z}"]).privacy, population,
                        population)
        for _ in range(rounds):
            ledger.compose()
        lo, hi = (z, hi) if ledger.spent()["epsilon"] > epsilon else (lo, z)
    return hi


def majority_accuracy(overrides: list[str]) -> float:
    """Accuracy of always answering the test set's most frequent label."""
    test, labels = D.load_test(compose(overrides))
    counts = Counter(test["label"])
    return max(counts.values()) / len(test)


def row(setting: str, target: float | None, out: dict[str, Any], noise: float | None) -> dict[str, Any]:
    """One table row from a run's results.json."""
    res = out["results"]
    final, privacy = res["final"], res.get("privacy") or {}
    spent = privacy.get("epsilon", privacy.get("epsilon_max"))
    return {"setting": setting, "preset": setting.split("/")[0], "finetune": setting.split("/")[1],
            "target_epsilon": target, "epsilon_spent": spent, "accuracy": final["accuracy"],
            "macro_f1": final["macro_f1"], "ndcg@10": final["ndcg@10"], "noise_multiplier": noise,
            "seconds": out["wall_seconds"]}


def plot(rows: list[dict[str, Any]], majority: float, title: str, name: str) -> None:
    """Accuracy against epsilon per setting, the non-private runs and the majority label as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in dict.fromkeys(r["setting"] for r in rows if r["target_epsilon"] is not None):
        points = sorted((r["target_epsilon"], r["accuracy"]) for r in rows if r["setting"] == setting)
        ax.plot(*zip(*points, strict=True), "o-", label=setting)
    for r in rows:
        if r["target_epsilon"] is None:
            ax.axhline(r["accuracy"], ls="--", lw=1, color="grey" if r["finetune"] == "lora" else "black",
                       label=f"{r['setting']} (epsilon = inf)")
    ax.axhline(majority, ls=":", color="red", label="majority label")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    """Run every setting, printing and writing each row as it finishes; then plot."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0])
    ap.add_argument("--full-epsilons", type=float, nargs="*", default=[8.0, 4.0, 2.0, 1.0],
                    help="example/full is the slowest setting (ghost clipping over 22.7M weights)")
    ap.add_argument("--only", default="none/lora,central/lora,example/lora,none/full,example/full")
    ap.add_argument("--name", default="privacy_utility", help="bench/results/<name>.json and .png")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = ["task=relevance", f"strategy.num_rounds={a.rounds}", f"train.local_epochs={a.epochs}",
            f"simulation.num_merchants={a.merchants}", "train.progress=false", "live.port=null", *a.overrides]
    only = a.only.split(",")
    majority = majority_accuracy(base)
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"overrides": base, "delta": 1e-5, "majority_accuracy": majority, "rows": rows}

    def record(r: dict[str, Any]) -> None:
        rows.append(r)
        print({k: r[k] for k in COLUMNS}, flush=True)
        write(a.name, doc)

    reference: dict[str, Any] | None = None
    for finetune in ("lora", "full"):
        if f"none/{finetune}" in only or (finetune == "lora" and "central/lora" in only):
            out = run_simulation([*base, f"finetune={finetune}"])
            record(row(f"none/{finetune}", None, out, None))
            reference = out if finetune == "lora" else reference
        if finetune == "lora" and "central/lora" in only and reference is not None:
            norms = [r["update_norm"] for rnd in reference["results"]["rounds"][1:] for r in rnd["replied"]]
            clip = statistics.median(norms)
            doc["central_clipping_norm"] = clip
            for eps in a.epsilons:
                z = noise_for(eps, a.rounds, a.merchants)
                out = run_simulation([*base, "finetune=lora", "privacy=central", f"privacy.noise_multiplier={z}",
                                      f"privacy.clipping_norm={clip}", f"privacy.target_epsilon={eps}"])
                record(row("central/lora", eps, out, z))
        if f"example/{finetune}" in only:
            for eps in a.epsilons if finetune == "lora" else a.full_epsilons:
                out = run_simulation([*base, f"finetune={finetune}", "privacy=example",
                                      f"privacy.target_epsilon={eps}"])
                record(row(f"example/{finetune}", eps, out, None))
    print(table(rows, COLUMNS))
    print(f"majority label accuracy {majority:.4f}")
    plot(rows, majority, f"{a.merchants} merchants, {a.rounds} rounds x {a.epochs} epochs", a.name)
    print("written:", RESULTS / f"{a.name}.json", RESULTS / f"{a.name}.png")


if __name__ == "__main__":
    main()
