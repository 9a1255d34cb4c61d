"""Per-run outputs: results.json (rewritten atomically each round), TensorBoard events, metrics plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.run import keys
from common.run.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from common.run.tracking import MlflowTracker

log = logging.getLogger(__name__)


class RunLog:
    """Collects one record per round and keeps results.json, TensorBoard, the console and the tracker (MLflow,
    when configured) in step."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], rounds: list[dict[str, Any]] | None = None,
                 tracker: MlflowTracker | None = None) -> None:
        self.run_dir = run_dir
        self.meta = meta
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        self.tracker = tracker
        if tracker is not None:
            meta["tracking"] = tracker.as_json()
        run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"))

    def add(self, record: dict[str, Any]) -> None:
        """Append a round record, log its one-line summary, write TensorBoard scalars and results.json."""
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]] + [record]
        step = int(record["round"])
        for group in ("server", "train", "evaluate"):
            for key, value in (record.get(group) or {}).items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{group}/{key}", value, step)
        self.tb.flush()
        if self.tracker is not None:
            self.tracker.log_round(record)
        log.info(summary_line(record))
        self.write()

    def update(self, round_: int, **fields: Any) -> None:
        """Add fields that arrive later (piggy-backed federated evaluation) to round `round_`'s record."""
        for record in self.rounds:
            if record["round"] == round_:
                record.update(fields)
                for key, value in (fields.get("evaluate") or {}).items():
                    if isinstance(value, int | float):
                        self.tb.add_scalar(f"evaluate/{key}", value, round_)
                self.tb.flush()
                if self.tracker is not None and fields.get("evaluate"):
                    self.tracker.log_round({"round": round_, "evaluate": fields["evaluate"]})
                self.write()
                return

    def write(self, **extra: Any) -> None:
        """Rewrite results.json atomically."""
        self.meta.update(extra)
        doc = {**self.meta, "rounds": self.rounds}
        atomic_write_bytes(self.run_dir / "results.json", json.dumps(doc, indent=2).encode())

    def close(self) -> None:
        """Flush TensorBoard, draw the plot, and hand the finished run to the tracker."""
        self.tb.close()
        plot(self.rounds, self.run_dir / "metrics.png", str(self.meta.get("title", "fedshop")))
        final = (self.rounds[-1].get("server") or {}) if self.rounds else {}
        if "confusion" in final:
            plot_confusion(final["confusion"], list(self.meta.get("labels", [])), self.run_dir / "confusion.png",
                           f"{self.meta.get('title', 'fedshop')}: round {self.rounds[-1]['round']}, "
                           f"{final.get('num-examples', sum(map(sum, final['confusion'])))} test pairs")
        if self.tracker is not None:
            self.tracker.finish(self.run_dir, str(self.meta.get("status")))


def final_line(final: dict[str, Any]) -> str:
    """The final metrics as one line: every number, then recall per class (`recall exact 0.91, ...`)."""
    parts = [f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)]
    if isinstance(final.get("recall"), dict):
        parts.append("recall " + ", ".join(f"{k} {v:.3f}" for k, v in final["recall"].items()))
    return " | ".join(parts)


def objective(final: dict[str, Any], metric: str) -> float:
    """The final metric a run returns to Hydra (what a sweeper such as Optuna maximises); 0.0 when absent."""
    value = final.get(metric)
    return float(value) if isinstance(value, int | float) else 0.0


def summary_line(record: dict[str, Any]) -> str:
    """`round 2 | loss 0.91 | acc 0.672 | macro-F1 0.397 | nDCG@10 0.937 | 41.2s`."""
    s = record.get("server") or {}
    parts = [f"round {record['round']}"]
    if "loss" in s:
        parts.append(f"loss {s['loss']:.4f}")
    for key, name in (("accuracy", "acc"), ("macro_f1", "macro-F1"), ("ndcg@10", "nDCG@10"),
                      ("catalog_ndcg@10", "catalog nDCG@10"), ("catalog_mrr", "MRR"),
                      ("catalog_recall@10", "recall@10"), ("hard_first", "hard_first")):
        if key in s:
            parts.append(f"{name} {s[key]:.3f}")
    if record.get("train") and keys.TRAIN_LOSS in record["train"]:
        parts.append(f"train-loss {record['train'][keys.TRAIN_LOSS]:.4f}")
    if record.get("privacy"):
        parts.append(f"epsilon {record['privacy']['epsilon']:.3f} (delta {record['privacy']['delta']:g})")
    if record.get("record_privacy"):
        rp = record["record_privacy"]
        parts.append(f"record epsilon max {rp['epsilon_max']:.3f} (delta {rp['delta']:g})"
                     + (f", {len(rp['declined'])} declined" if rp["declined"] else ""))
    parts.append(f"{record.get('seconds', 0.0):.1f}s")
    return " | ".join(parts)


def plot(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    """Server-side metrics (and mean train loss) per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["round"] for r in rounds]
    for key in ("accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "catalog_recall@10", "hard_first"):
        ys = [(r.get("server") or {}).get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax1.plot(xs, ys, marker="o", label=key)
    ax1.set_xlabel("round")
    ax1.set_title("global model on held-out test")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for group, key, label in (("server", "loss", "test loss"), ("train", keys.TRAIN_LOSS, "train loss (merchants)"),
                              ("evaluate", "loss", "validation loss (merchants)")):
        pts = [(r["round"], (r.get(group) or {}).get(key)) for r in rounds]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax2.set_xlabel("round")
    ax2.set_title("loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[float]], labels: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a PNG: counts, and each true label's row as a share (the colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, f"{m[i, j]:.0f}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row share = recall)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
