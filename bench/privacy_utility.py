"""Privacy-utility curves, side by side from one run: final quality against epsilon.

Same data, rounds, merchants and seeds for every row (10 merchants, every merchant every round):
- `none/<finetune>`: no DP (epsilon = inf), LoRA and full fine-tuning.
- `central/lora`, `client/lora`: merchant-level DP (server-side or merchant-side fixed clipping). For each
  epsilon the noise multiplier is the smallest that keeps the rounds within it (the run's own accountant); the
  clipping norm is the median update norm of the non-private run, so clipping alone costs little and the curve
  shows the noise.
- `example/<finetune>`: record-level DP-SGD on every merchant (privacy=example), each merchant's noise derived
  from target epsilon at delta = 1e-5 per merchant dataset; `epsilon_spent` is the largest any merchant spent.
--task retrieval (the default, the dual encoder) reports catalog nDCG@10, recall@10 and hard_first, and the
share of the non-private gain over round 0 (the pretrained encoder, `round0_catalog_ndcg@10`) each row keeps;
--task relevance (the cross-encoder) accuracy, macro-F1 and nDCG@10 against the majority label. Rows are
written to bench/results/<name>.json as they finish (a long run keeps what it has measured); the plot is
bench/results/<name>.png.
Usage: python bench/privacy_utility.py [--task retrieval] [--rounds 3] [--epochs 1] [--epsilons 8 4 2 1]
       [--full-epsilons 8 4 2 1] [--merchant-epsilons 8 2] [--only none/lora,example/lora,...]
       [--name privacy_utility_dual] [extra Hydra overrides...]
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

QUALITY = ("catalog_ndcg@10", "catalog_recall@10", "hard_first", "accuracy", "macro_f1", "ndcg@10")
COLUMNS = ["setting", "target_epsilon", "epsilon_spent", *QUALITY, "gain_kept", "noise_multiplier", "seconds"]


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
    """One table row from a run's results.json (the quality metrics its task reports)."""
    res = out["results"]
    final, privacy = res["final"], res.get("privacy") or {}
    spent = privacy.get("epsilon", privacy.get("epsilon_max"))
    return {"setting": setting, "preset": setting.split("/")[0], "finetune": setting.split("/")[1],
            "target_epsilon": target, "epsilon_spent": spent, **{k: final[k] for k in QUALITY if k in final},
            "noise_multiplier": noise, "seconds": out["wall_seconds"]}


def plot(rows: list[dict[str, Any]], floor: tuple[str, float], metric: str, title: str, name: str) -> None:
    """`metric` against epsilon per setting, the non-private runs and the floor (majority label or round 0) as
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in dict.fromkeys(r["setting"] for r in rows if r["target_epsilon"] is not None):
        points = sorted((r["target_epsilon"], r[metric]) for r in rows if r["setting"] == setting)
        ax.plot(*zip(*points, strict=True), "o-", label=setting)
    for r in rows:
        if r["target_epsilon"] is None:
            ax.axhline(r[metric], ls="--", lw=1, color="grey" if r["finetune"] == "lora" else "black",
                       label=f"{r['setting']} (epsilon = inf)")
    ax.axhline(floor[1], ls=":", color="red", label=floor[0])
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    """Run every setting, printing and writing each row as it finishes; then plot."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="retrieval")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--merchants", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0])
    ap.add_argument("--full-epsilons", type=float, nargs="*", default=[8.0, 4.0, 2.0, 1.0])
    ap.add_argument("--merchant-epsilons", type=float, nargs="*", default=[8.0, 2.0])
    ap.add_argument("--only", default="none/lora,central/lora,client/lora,example/lora,none/full,example/full")
    ap.add_argument("--name", default="privacy_utility_dual", help="bench/results/<name>.json and .png")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base = [f"task={a.task}", f"strategy.num_rounds={a.rounds}", f"train.local_epochs={a.epochs}",
            f"simulation.num_merchants={a.merchants}", "train.progress=false", "live.port=null", *a.overrides]
    only = a.only.split(",")
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"overrides": base, "delta": 1e-5, "rows": rows}

    def record(r: dict[str, Any]) -> None:
        if "round0_catalog_ndcg@10" in doc and "catalog_ndcg@10" in r:
            reference = next((x for x in rows if x["setting"] == f"none/{r['finetune']}"), r)
            r0, top = doc["round0_catalog_ndcg@10"], reference["catalog_ndcg@10"]
            r["gain_kept"] = (r["catalog_ndcg@10"] - r0) / (top - r0) if top != r0 else None
        rows.append(r)
        print({k: r.get(k) for k in COLUMNS}, flush=True)
        write(a.name, doc)

    for finetune in ("lora", "full"):
        merchant_level = [p for p in ("central", "client") if f"{p}/lora" in only] if finetune == "lora" else []
        if f"none/{finetune}" not in only and not merchant_level:
            reference = None
        else:
            reference = run_simulation([*base, f"finetune={finetune}"])
            describe_floor(doc, reference["results"], base)
            record(row(f"none/{finetune}", None, reference, None))
        for preset in merchant_level:
            assert reference is not None
            norms = [r["update_norm"] for rnd in reference["results"]["rounds"][1:] for r in rnd["replied"]]
            clip = doc["merchant_clipping_norm"] = statistics.median(norms)
            for eps in a.merchant_epsilons:
                z = noise_for(eps, a.rounds, a.merchants)
                out = run_simulation([*base, "finetune=lora", f"privacy={preset}", f"privacy.noise_multiplier={z}",
                                      f"privacy.clipping_norm={clip}", f"privacy.target_epsilon={eps}"])
                record(row(f"{preset}/lora", eps, out, z))
        if f"example/{finetune}" in only:
            for eps in a.epsilons if finetune == "lora" else a.full_epsilons:
                out = run_simulation([*base, f"finetune={finetune}", "privacy=example",
                                      f"privacy.target_epsilon={eps}"])
                record(row(f"example/{finetune}", eps, out, None))
    print(table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    metric = "catalog_ndcg@10" if "round0_catalog_ndcg@10" in doc else "accuracy"
    floor = ("round 0 (pretrained)", doc["round0_catalog_ndcg@10"]) if metric == "catalog_ndcg@10" else \
        ("majority label", doc["majority_accuracy"])
    plot(rows, floor, metric, f"{a.merchants} merchants, {a.rounds} rounds x {a.epochs} epochs", a.name)
    print("written:", RESULTS / f"{a.name}.json", RESULTS / f"{a.name}.png")


def describe_floor(doc: dict[str, Any], results: dict[str, Any], base: list[str]) -> None:
    """What a private row must beat: round 0's catalog figures (the pretrained encoder on the whole held-out set)
    for a retriever, the majority label's accuracy for a classifier."""
    retrieval = (results.get("baselines") or {}).get("retrieval")
    if retrieval and "catalog_ndcg@10" in results["final"]:
        doc.update({f"round0_{k}": retrieval[k] for k in ("catalog_ndcg@10", "catalog_recall@10", "hard_first")})
    elif "majority_accuracy" not in doc:
        doc["majority_accuracy"] = majority_accuracy(base)


if __name__ == "__main__":
    main()
