"""The `Task` interface: everything that differs between learning tasks, in one place.

A task owns its data (built-in generator, grouping, config checks), its model (build, tokenise, save as a Hugging
Face directory), its loss and training step, its evaluation (a merchant's validation split and the server's
held-out set), its exchanged state and the scorer a service calls. Client, server, baselines, bench/ and
serving/ get it from common.tasks.registry and never branch on the task's name.

The defaults here are the sequence classifier's (the `relevance` and `sentiment` tasks); a task overrides what
differs. `Workbench` is the model set-up sequence written once: seed, threads, tokenizer, model, label gains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from common.run.config import FedshopConfig
from common.run.errors import FedshopError
from common.tasks import exchange
from common.tasks import model as M
from common.tasks import train as T
from common.tasks.dp import RecordDP
from common.tasks.synthetic import JudgedSet

PairScorer = Callable[[list[str], list[str]], np.ndarray]


class HeldOut(Protocol):
    """The server's held-out evaluation of a task: what every mode scores the global model with."""

    num_examples: int

    def describe(self) -> dict[str, Any]:
        """results.json's `evaluation`: what is scored, per round and at the end."""
        ...

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Reference rankers scored on the same set ({} when the task has none)."""
        ...

    def __call__(self, model: torch.nn.Module, full: bool) -> dict[str, Any]:
        """The model's metrics on the round subset, or (full) on the whole set."""
        ...


@dataclass
class Workbench:
    """A task's model set up for a run: the model (skeleton, exchanged state overwritten by each message), its
    tokenizer, the label names and their ranking gains (None without a ranking)."""

    task: Task
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    gains: list[float] | None


def train_seed(seed: int, server_round: int, merchant: int | None = None) -> int:
    """The seed of one round's local training: a merchant's (federated, alone) or the pooled model's (None)."""
    base = seed * 1_000_003
    return base + server_round if merchant is None else base + server_round * 1009 + merchant


class Task:
    """A learning task (subclass it and register it with common.tasks.registry.register_task)."""

    name: ClassVar[str] = ""
    pair: ClassVar[bool] = False  # examples carry a second text (data.columns.text_pair)
    group_by_text: ClassVar[bool] = False  # no query_id column: an example's group is its text (a query)
    serves_as: ClassVar[str] = ""  # what the ranking service uses its model as: reranker | retriever | "" (none)

    def __init__(self, cfg: FedshopConfig) -> None:
        self.cfg = cfg

    # data ------------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a config this task cannot run, naming the field."""
        if self.pair and not self.cfg.data.columns.text_pair:
            raise FedshopError(f"data.columns.text_pair: a column name is needed for data.task={self.cfg.data.task}")

    def generate(self, seed: int) -> list[dict[str, object]]:
        """Rows of the built-in data (data.source=synthetic)."""
        raise FedshopError(f"data.source=synthetic: data.task={self.cfg.data.task} has no built-in data; use "
                           f"data=csv with data.path")

    def judged(self) -> JudgedSet | None:
        """The built-in judged test set and catalog (None when the task or data has none)."""
        return None

    def label_gains(self, labels: list[str]) -> list[float] | None:
        """Per-label ranking gains (None when the task does not rank)."""
        return None

    # model -----------------------------------------------------------------------------------------------------
    def build_model(self, labels: list[str], seed: int) -> torch.nn.Module:
        """The model a run starts from (its new parts initialised from `seed`), wrapped as finetune says."""
        return M.build_model(self.cfg.model, labels, seed, self.cfg.finetune)

    def workbench(self, labels: list[str]) -> Workbench:
        """Seed, threads, tokenizer, model and gains: the set-up every mode and process does once."""
        T.set_seed(self.cfg.seed)
        T.configure_threads(self.cfg.train)
        return Workbench(self, self.build_model(labels, self.cfg.seed), M.load_tokenizer(self.cfg.model), labels,
                         self.label_gains(labels))

    def tokenize(self, ds: datasets.Dataset, wb: Workbench) -> datasets.Dataset:
        """Token ids of a split, cached beside a file-backed split."""
        return M.tokenize(ds, wb.tokenizer, self.cfg.train.max_length, self.cfg.data.num_proc)

    def save(self, wb: Workbench, out_dir: Path, adapter_dir: Path | None = None) -> None:
        """Write the final model as a Hugging Face directory (adapters merged; the adapter too when asked)."""
        M.save_final(wb.model, wb.tokenizer, wb.labels, out_dir, adapter_dir, task=self.cfg.data.task)

    # training and evaluation -----------------------------------------------------------------------------------
    def criterion(self, ds: datasets.Dataset, wb: Workbench) -> T.Criterion:
        """The loss of (model outputs, labels) on a tokenised split (train.loss: ce, balanced or focal)."""
        return T.criterion(self.cfg.train, ds["label"], len(wb.labels))

    def num_records(self, ds: datasets.Dataset) -> int:
        """How many records a split holds for privacy=example (its sampling rate and steps): one per row."""
        return len(ds)

    def train(self, wb: Workbench, ds: datasets.Dataset, epochs: int, seed: int, proximal_mu: float = 0.0,
              desc: str = "train", dp: RecordDP | None = None) -> dict[str, float]:
        """Fine-tune wb.model in place on a tokenised split; mean loss, num-examples, seconds."""
        return T.train(wb.model, ds, wb.tokenizer, self.cfg.train, epochs, seed, self.criterion(ds, wb),
                       proximal_mu=proximal_mu, desc=desc, dp=dp)

    def evaluate(self, wb: Workbench, ds: datasets.Dataset) -> dict[str, float]:
        """Metrics of wb.model on a tokenised split (a merchant's validation split)."""
        return T.evaluate(wb.model, ds, wb.tokenizer, self.cfg.train, wb.gains)

    def evaluation(self, wb: Workbench, test_raw: datasets.Dataset) -> HeldOut:
        """The server's held-out evaluation over the raw test split (tokenised once)."""
        from common.tasks.evaluation import Evaluation

        return Evaluation(self.cfg, test_raw, wb.labels, wb.tokenizer, self.judged(), wb.gains)

    # exchange and serving --------------------------------------------------------------------------------------
    def exchanged(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The state that travels: every trainable tensor (LoRA: adapters and modules_to_save)."""
        return exchange.extract(model)

    def load_exchanged(self, model: torch.nn.Module, weights: dict[str, Any]) -> None:
        """Overwrite the model's exchanged state with received arrays (names and shapes checked)."""
        exchange.load(model, weights)

    def scorer(self, model_dir: Path) -> PairScorer:
        """A (queries, product texts) -> relevance scorer over a saved model directory: what a service ranks by."""
        raise FedshopError(f"{model_dir}: data.task={self.cfg.data.task} does not rank (query, product) pairs")
