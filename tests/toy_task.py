"""A task defined outside fedshop, selected by import path (data.task=tests.toy_task:ToyRating): a regression
head on the tiny model that predicts a review's rating (its label's position: negative 0, neutral 1, positive 2).
It is the whole of what adding a task takes; tests/test_tasks.py runs it through a simulation and a baseline."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from common.tasks import model as M
from common.tasks import synthetic
from common.tasks.base import HeldOut, Task, Workbench


class ToyRating(Task):
    """Rating regression: one output, mean squared error."""

    def generate(self, seed: int) -> list[dict[str, object]]:
        """The built-in reviews."""
        s = self.cfg.data.synthetic
        return synthetic.generate_reviews(s.num_merchants, s.num_reviews, seed, s.concentration, s.label_noise)

    def build_model(self, labels: list[str], seed: int) -> torch.nn.Module:
        """The tiny model with one regression output."""
        model = M.build_model(self.cfg.model, ["rating"], seed, self.cfg.finetune)
        model.config.problem_type = "regression"  # type: ignore[union-attr]
        return model

    def tokenize(self, ds: datasets.Dataset, wb: Workbench) -> datasets.Dataset:
        """Tokens, and the label as a float target."""
        return super().tokenize(ds, wb).cast_column("label", datasets.Value("float32"))

    def criterion(self, ds: datasets.Dataset, wb: Workbench) -> Any:
        """Mean squared error of the single output."""
        return lambda out, y: F.mse_loss(out.squeeze(-1).float(), y.float())

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, ds: datasets.Dataset, tokenizer: Any) -> np.ndarray:
        """The predicted rating of every example."""
        model.eval()
        preds = []
        for start in range(0, len(ds), 64):
            rows = ds[start:start + 64]
            enc = tokenizer.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                                return_tensors="pt")
            preds.append(model(**enc).logits.squeeze(-1).double().numpy())
        return np.concatenate(preds)

    def evaluate(self, wb: Workbench, ds: datasets.Dataset) -> dict[str, float]:
        """loss (MSE) and mean absolute error."""
        if len(ds) == 0:
            return {"loss": 0.0, "mae": 0.0, "num-examples": 0}
        err = self.predict(wb.model, ds, wb.tokenizer) - np.asarray(ds["label"], dtype=np.float64)
        return {"loss": float((err ** 2).mean()), "mae": float(np.abs(err).mean()), "num-examples": len(ds)}

    def evaluation(self, wb: Workbench, test_raw: datasets.Dataset) -> HeldOut:
        """The test split scored whole every round."""
        return _HeldOut(self, wb, self.tokenize(test_raw, wb))


class _HeldOut:
    def __init__(self, task: ToyRating, wb: Workbench, test: datasets.Dataset) -> None:
        self.task, self.wb, self.test, self.num_examples = task, wb, test, len(test)

    def describe(self) -> dict[str, Any]:
        return {"test_examples": self.num_examples, "per_round": "full", "final": "full"}

    def baselines(self) -> dict[str, dict[str, Any]]:
        return {}

    def __call__(self, model: torch.nn.Module, full: bool) -> dict[str, Any]:
        return {**self.task.evaluate(replace(self.wb, model=model), self.test), "eval": "full"}
