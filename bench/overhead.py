"""Framework overhead: a simulated Flower round vs the same work done directly, measured in one run.

The direct loop does per round exactly what the simulation does (each sampled merchant trains its
shard from the global weights, example-weighted averaging, merchants evaluate on their validation
split, the server evaluates on the test split), in one process without Flower. Round 1 of each is
left out (Ray start, data loading, tokenisation). Usage: python bench/overhead.py [--model tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _util import run_simulation, table, write

from common.run.config import compose
from common.tasks import data as D
from common.tasks.base import train_seed
from common.tasks.registry import get_task


def direct_rounds(overrides: list[str]) -> list[float]:
    """Seconds per round of the federated computation without Flower."""
    cfg = compose(overrides)
    fd = D.prepare(cfg)
    wb = get_task(cfg).workbench(fd.labels)
    task, model = wb.task, wb.model
    trains = [task.tokenize(t, wb) for t in fd.train]
    vals = [task.tokenize(v, wb) for v in fd.val]
    test = task.tokenize(fd.test, wb)
    weights = task.exchanged(model)
    task.evaluate(wb, test)
    seconds = []
    for rnd in range(1, cfg.strategy.num_rounds + 1):
        t0 = time.perf_counter()
        updates = []
        for k, train in enumerate(trains):
            task.load_exchanged(model, weights)
            task.train(wb, train, cfg.train.local_epochs, train_seed(cfg.seed, rnd, k))
            updates.append((task.exchanged(model), len(train)))
        total = sum(n for _, n in updates)
        weights = {key: np.sum([w[key] * (n / total) for w, n in updates], axis=0) for key in weights}
        task.load_exchanged(model, weights)
        for val in vals:
            task.evaluate(wb, val)
        task.evaluate(wb, test)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    """Measure both side by side and print the ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--merchants", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    overrides = [f"model={a.model}", f"simulation.num_merchants={a.merchants}", f"strategy.num_rounds={a.rounds}",
                 "train.progress=false", "train.local_epochs=1"]
    sim = run_simulation(overrides)
    sim_rounds = [r["seconds"] for r in sim["results"]["rounds"] if r["round"] >= 1]
    direct = direct_rounds(overrides)
    rows = [{"setting": "Flower simulation", "round_s_median": statistics.median(sim_rounds[1:]),
             "first_round_s": sim_rounds[0]},
            {"setting": "direct (no Flower)", "round_s_median": statistics.median(direct[1:]),
             "first_round_s": direct[0]}]
    ratio = rows[0]["round_s_median"] / rows[1]["round_s_median"]
    print(table(rows, ["setting", "round_s_median", "first_round_s"]))
    print(f"simulated / direct round time: {ratio:.3f}x (target <= 1.15x)")
    print("written:", write(f"overhead_{a.model}", {"overrides": overrides, "simulation_rounds_s": sim_rounds,
                                                     "direct_rounds_s": direct, "ratio": ratio,
                                                     "simulation_wall_s": sim["wall_seconds"]}))


if __name__ == "__main__":
    main()
