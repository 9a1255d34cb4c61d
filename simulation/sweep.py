"""Hydra callback: after a multirun (the grid or Optuna's search), a summary table (CSV and Markdown) of every job's
final metrics, the best job by the run's `objective` marked."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
METRICS = ("accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first",
           "min_recall", "loss")


def summarize(sweep_dir: Path, objective: str = "macro_f1") -> list[dict[str, Any]]:
    """Collect each job's overrides and final metrics; write summary.csv and summary.md in sweep_dir, with
    `best` = yes on the completed job of the highest final `objective`."""
    rows: list[dict[str, Any]] = []
    for results in sorted(sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = results.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        doc = json.loads(results.read_text())
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides or []),
                               "status": doc.get("status", "?")}
        final = dict(doc.get("final") or {})
        if isinstance(final.get("recall"), dict) and final["recall"]:
            final["min_recall"] = min(final["recall"].values())
        row.update({m: round(float(final[m]), 4) for m in METRICS if m in final})
        rows.append(row)
    if not rows:
        return rows
    done = [r for r in rows if r["status"] == "completed" and objective in r]
    best = max(done, key=lambda r: r[objective]) if done else None
    for r in rows:
        r["best"] = "yes" if r is best else ""
    cols = ["job", "best", "overrides", "status", *[m for m in METRICS if any(m in r for r in rows)]]
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Writes summary.csv / summary.md into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra hook."""
        rows = summarize(Path(config.hydra.sweep.dir), str(config.get("objective", "macro_f1")))
        best = next((r for r in rows if r.get("best")), None)
        log.info("sweep summary of %d jobs written to %s; best by %s: %s", len(rows), config.hydra.sweep.dir,
                 config.get("objective"), best["overrides"] if best else "none completed")
