"""Local training and evaluation loops (AdamW, linear warmup/decay, clipping, optional FedProx term or DP-SGD)."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from common.run import keys
from common.run.config import TrainConfig
from common.tasks.dp import RecordDP
from common.tasks.metrics import classification_report


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(cfg: TrainConfig) -> None:
    """Apply train.num_threads to torch's CPU thread pool."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loader(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int,
            shuffle: bool, seed: int) -> DataLoader:
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label") if c in ds.column_names]
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds.select_columns(cols).with_format("python"), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, collate_fn=collate)


def _batches(loader: DataLoader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for batch in loader:
        batch = dict(batch)
        batch["labels"] = batch.pop("label") if "label" in batch else batch.pop("labels")
        yield {k: v.to(device) for k, v in batch.items()}


def optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over the trainable parameters (LoRA: adapters and head only), no decay on biases and norms."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not any(x in n for x in no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if any(x in n for x in no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr), [p for _, p in trainable]


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def criterion(cfg: TrainConfig, labels: list[int], num_labels: int) -> Criterion:
    """train.loss as a function of (logits, labels): cross-entropy; `balanced`, cross-entropy weighted by the
    inverse frequency of each label in this merchant's own training split (every present label weighs the same in
    total); `focal`, focal loss (Lin et al. 2017), -(1 - p_true)^train.focal_gamma * log p_true, averaged."""
    if cfg.loss == "balanced":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).astype(np.float64)
        present = counts > 0
        weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1.0)), 0.0)
        w = torch.tensor(weights, dtype=torch.float32)
        return lambda logits, y: F.cross_entropy(logits.float(), y, weight=w.to(logits.device))
    if cfg.loss == "focal":
        gamma = cfg.focal_gamma

        def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logp = F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)
            return (-((1.0 - logp.exp()) ** gamma) * logp).mean()

        return focal
    return lambda logits, y: F.cross_entropy(logits.float(), y)


def train(model: torch.nn.Module, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig,
          epochs: int, seed: int, loss_of: Criterion | None = None, proximal_mu: float = 0.0, desc: str = "train",
          dp: RecordDP | None = None) -> dict[str, float]:
    """Fine-tune in place for `epochs` over tokenised `ds` with `loss_of` (default: train.loss over the model's
    labels); returns mean loss, num-examples, seconds.

    With `dp` (privacy=example) every step is DP-SGD: Opacus clips each example's gradient, adds the noise and
    draws Poisson batches, and `dp.history` gains the steps; train.grad_clip is not applied then."""
    t0 = time.perf_counter()
    set_seed(seed)
    device = pick_device(cfg.device)
    model.to(device)
    model.train()
    loader = _loader(ds, tokenizer, cfg.batch_size, shuffle=True, seed=seed)
    steps = max(1, epochs * len(loader))
    opt, params = optimizer(model, cfg)
    if dp is not None:
        opt, loader = dp.attach(model, opt, loader)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * steps), steps)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    if loss_of is None:  # DP-SGD uses Opacus's (the config allows only ce then)
        loss_of = criterion(cfg, ds["label"], int(model.config.num_labels))  # type: ignore[union-attr, arg-type]
    total_loss, seen = 0.0, 0
    try:
        for epoch in range(epochs):
            bar = tqdm(_batches(loader, device), total=len(loader), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                       disable=None if cfg.progress else True, leave=False, mininterval=1.0)
            for batch in bar:
                if dp is not None:
                    batch = dp.per_example_inputs(model, batch)
                with autocast(device):
                    out = model(**batch)
                loss = loss_of(out.logits, batch["labels"]) if dp is None else dp.loss(out, batch["labels"])
                if anchor:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * proximal_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dp is None and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                n = int(batch["labels"].shape[0])
                if n:  # a Poisson batch may be empty: DP-SGD still takes its noise-only step
                    total_loss += float(out.loss.detach()) * n
                    seen += n
                    bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
    finally:
        if dp is not None:
            dp.detach()
    model.to("cpu")
    return {keys.TRAIN_LOSS: total_loss / max(seen, 1), keys.NUM_EXAMPLES: len(ds),
            keys.TRAIN_SECONDS: time.perf_counter() - t0}


@torch.no_grad()
def predict(model: torch.nn.Module, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
            cfg: TrainConfig) -> tuple[np.ndarray, float]:
    """Class probabilities (float64, one row per example) and the mean cross-entropy loss."""
    device = pick_device(cfg.device)
    model.to(device)
    model.eval()
    probs, total_loss = [], 0.0
    for batch in _batches(_loader(ds, tokenizer, cfg.eval_batch_size, shuffle=False, seed=0), device):
        with autocast(device):
            out = model(**batch)
        logits = out.logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        probs.append(torch.softmax(logits, dim=-1).cpu().double().numpy())
    model.to("cpu")
    return np.concatenate(probs), total_loss / max(len(ds), 1)


def evaluate(model: torch.nn.Module, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig,
             label_gains: list[float] | None) -> dict[str, float]:
    """loss, accuracy, macro_f1 and (relevance) ndcg@10 of the model on tokenised `ds`."""
    if len(ds) == 0:
        return {"loss": 0.0, "accuracy": 0.0, "macro_f1": 0.0, keys.NUM_EXAMPLES: 0}
    probs, loss = predict(model, ds, tokenizer, cfg)
    report = classification_report(ds["label"], probs, probs.shape[1], ds["query_id"], label_gains)
    return {"loss": loss, **report, keys.NUM_EXAMPLES: len(ds)}
