"""`relevance`: the cross-encoder classifier. (query, product text) -> exact / substitute / complement / irrelevant
(Amazon ESCI), ranked by expected gain (data.gains); the built-in marketplace's judged catalog evaluates it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.run.errors import FedshopError
from common.tasks import synthetic
from common.tasks.base import PairScorer, Task
from common.tasks.metrics import expected_gain
from common.tasks.registry import register_task


def esci_gains(labels: list[str], gains: dict[str, float]) -> list[float]:
    """Each label's ranking gain: data.gains (conf/data/gains/esci.yaml) for a named grade, the number itself for a
    numeric one ("0.5"); a label that is neither is refused."""
    def gain(name: str) -> float | None:
        if name in gains:
            return float(gains[name])
        try:
            value = float(name)
        except ValueError:
            return None
        return value if 0.0 <= value < float("inf") else None

    found = {name: gain(name) for name in labels}
    missing = [name for name, g in found.items() if g is None]
    if missing:
        raise FedshopError(f"data.gains has no gain for label(s) {missing} (nor are they numbers >= 0); labels are "
                           f"{labels}")
    return [float(g) for g in found.values() if g is not None]


@register_task("relevance")
class RelevanceTask(Task):
    """Cross-encoder over (query, product text) pairs, graded by ESCI gains."""

    pair = True
    group_by_text = True
    serves_as = "reranker"

    def generate(self, seed: int) -> list[dict[str, object]]:
        """The built-in marketplace's training queries and their judged products."""
        s = self.cfg.data.synthetic
        return synthetic.generate_relevance(s.num_merchants, s.num_queries, seed, s.concentration, s.label_noise)

    def judged(self) -> synthetic.JudgedSet | None:
        """The built-in marketplace's judged test set (none for a data file or a fixed test file)."""
        d = self.cfg.data
        if d.source != "synthetic" or d.test_path:
            return None
        return synthetic.generate_judged(d.synthetic.num_merchants, d.synthetic.test_queries, self.cfg.seed,
                                    d.synthetic.concentration, d.synthetic.hard_queries)

    def label_gains(self, labels: list[str]) -> list[float] | None:
        """data.gains of each label."""
        return esci_gains(labels, dict(self.cfg.data.gains))

    def scorer(self, model_dir: Path) -> PairScorer:
        """Expected gain of (query, title) pairs under a saved cross-encoder (fp32)."""
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        gains = esci_gains(labels, dict(self.cfg.data.gains))

        def score(queries: list[str], titles: list[str]) -> np.ndarray:
            enc = tokenizer(queries, titles, truncation=True, max_length=self.cfg.train.max_length, padding=True,
                            return_tensors="pt")
            with torch.inference_mode():
                probs = torch.softmax(model(**enc).logits.float(), dim=-1).double().numpy()
            return expected_gain(probs, gains)

        return score
