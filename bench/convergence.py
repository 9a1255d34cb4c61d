"""Federated against pooled, to convergence: the dual encoder trained federated (by round) and centralized (by
epoch) on the same data and model, each scored on the whole held-out evaluation after every round or epoch, until
its catalog nDCG@10 has not improved by --min-delta for --patience evaluations (or --max-epochs epochs-equivalent).

Federated is FedAvg over the merchants in process (common/tasks' training and the exchanged state, weighted by
num-examples: the simulation's arithmetic without Flower's transport), so both sides cost the same per epoch.
Rows go to bench/results/convergence.json as they finish (a cut run keeps what it has); --plot redraws
bench/results/convergence.png (catalog nDCG@10 against epochs-equivalent and against wall time).

    python bench/convergence.py centralized
    python bench/convergence.py federated --name fed_le2 train.local_epochs=2
    python bench/convergence.py --plot
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from _util import RESULTS, table

from common.run.config import compose
from common.tasks import data as D
from common.tasks.base import Task, Workbench, train_seed
from common.tasks.registry import get_task

OUT = RESULTS / "convergence.json"
SHOWN = ["catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first", "ndcg@10"]


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.is_file() else {"runs": {}}


def _save(doc: dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1))


def _fedavg_round(task: Task, wb: Workbench, shards: list[Any], weights: dict[str, np.ndarray], rnd: int,
                  epochs: int, seed: int) -> dict[str, np.ndarray]:
    updates = []
    for k, shard in enumerate(shards):
        task.load_exchanged(wb.model, weights)
        task.train(wb, shard, epochs, train_seed(seed, rnd, k))
        updates.append((task.exchanged(wb.model), len(shard)))
    total = sum(n for _, n in updates)
    return {key: np.sum([w[key] * (n / total) for w, n in updates], axis=0).astype(weights[key].dtype)
            for key in weights}


def run(mode: str, name: str, overrides: list[str], patience: int, min_delta: float, max_epochs: int) -> None:
    """Train until the catalog nDCG@10 stops improving; one row per evaluation into convergence.json."""
    cfg = compose(["task=retrieval", "train.progress=false", *overrides])
    fd = D.prepare(cfg)
    task = get_task(cfg)
    wb = task.workbench(fd.labels)
    ev = task.evaluation(wb, fd.test)
    per_step = 1 if mode == "centralized" else cfg.train.local_epochs
    doc = _load()
    rows: list[dict[str, Any]] = []
    doc["runs"][name] = {"mode": mode, "overrides": overrides, "local_epochs": per_step, "rows": rows}
    start = ev(wb.model, True)
    rows.append({"step": 0, "epochs": 0, "seconds": 0.0, **{k: start[k] for k in SHOWN}})
    _save(doc)
    shards = [task.tokenize(t, wb) for t in fd.train]
    pooled = task.tokenize(fd.pooled_train, wb)
    weights, best, stale, spent, step = task.exchanged(wb.model), start["catalog_ndcg@10"], 0, 0.0, 0
    while stale < patience and (step + 1) * per_step <= max_epochs:
        step += 1
        t0 = time.perf_counter()
        if mode == "centralized":
            task.train(wb, pooled, 1, train_seed(cfg.seed, step))
        else:
            weights = _fedavg_round(task, wb, shards, weights, step, per_step, cfg.seed)
            task.load_exchanged(wb.model, weights)
        spent += time.perf_counter() - t0
        scores = ev(wb.model, True)
        rows.append({"step": step, "epochs": step * per_step, "seconds": round(spent, 1),
                     **{k: scores[k] for k in SHOWN}, "hard_first_by_kind": scores.get("hard_first_by_kind")})
        improved = scores["catalog_ndcg@10"] > best + min_delta
        best, stale = max(best, scores["catalog_ndcg@10"]), 0 if improved else stale + 1
        print(f"{name} step {step} ({step * per_step} epochs, {spent:.0f}s): "
              + " ".join(f"{k} {scores[k]:.4f}" for k in SHOWN), flush=True)
        _save(doc)
    doc["runs"][name]["converged"] = stale >= patience
    doc["runs"][name]["best"] = max(r["catalog_ndcg@10"] for r in rows)
    _save(doc)


def plot() -> None:
    """convergence.png: catalog nDCG@10 per run against epochs-equivalent and against training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = _load()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in doc["runs"].items():
        xs_e = [x["epochs"] for x in r["rows"]]
        xs_t = [x["seconds"] for x in r["rows"]]
        ys = [x["catalog_ndcg@10"] for x in r["rows"]]
        a.plot(xs_e, ys, marker="o", label=name)
        b.plot(xs_t, ys, marker="o", label=name)
    a.set_xlabel("epochs (federated: rounds x local epochs)")
    b.set_xlabel("training seconds (this CPU)")
    for ax in (a, b):
        ax.set_ylabel("catalog nDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("dual encoder: federated vs centralized, held-out catalog")
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence.png", dpi=110)
    summary = [{"run": n, "mode": r["mode"], "local_epochs": r["local_epochs"], "epochs": r["rows"][-1]["epochs"],
                "best": round(r.get("best", max(x["catalog_ndcg@10"] for x in r["rows"])), 4),
                "converged": r.get("converged")} for n, r in doc["runs"].items()]
    print(table(summary, ["run", "mode", "local_epochs", "epochs", "best", "converged"]))


def main() -> None:
    """Run one setting, or draw the plot and table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["federated", "centralized"])
    ap.add_argument("--name")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--min-delta", type=float, default=0.005)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.mode:
        run(a.mode, a.name or a.mode, a.overrides, a.patience, a.min_delta, a.max_epochs)
    if a.plot or not a.mode:
        plot()


if __name__ == "__main__":
    main()
