"""`retrieval`: the dual encoder. Query and product text go through one encoder (mean-pooled, L2-normalised) and
score by cosine; training is a listwise softmax over each query's judged products and the other queries' products
in the batch (in-batch negatives), its target the query's ESCI gains normalised to sum to one (ListNet's top-one
probability), at retrieval.temperature. Round 0 is the pretrained bi-encoder the service already retrieves with.

Under privacy=example a record is one query with its judged products, and DP-SGD scores each record against its
own products only: an in-batch negative would make one record's loss depend on another's, and per-record clipping
would then no longer bound what a record changes.

The final model is a sentence-embedding directory: AutoModel loads it, serving.retriever and eval.retriever accept
it, and sentence-transformers reads its modules.json and 1_Pooling/ as mean pooling plus normalisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common.run import keys
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks import model as M
from common.tasks import train as T
from common.tasks.base import HeldOut, PairScorer, Workbench
from common.tasks.dp import RecordDP
from common.tasks.dp import sample_rate as dp_sample_rate
from common.tasks.dp import steps_per_round as dp_steps
from common.tasks.encoder import Encoder, encode_texts, mean_pooled
from common.tasks.evaluation import References, hard_first, references, top_k
from common.tasks.metrics import catalog_ranking, ndcg_at_k
from common.tasks.registry import register_task
from common.tasks.relevance import RelevanceTask


@dataclass
class Group:
    """One query and its judged products (token ids) with their gains."""

    query: list[int]
    products: list[list[int]]
    gains: list[float]


def groups_of(ds: datasets.Dataset, gains: list[float], source: str = "training data") -> list[Group]:
    """A tokenised split as query groups, in order of first appearance; a query without any product of positive
    gain cannot be learnt from and is refused, naming it."""
    found: dict[str, Group] = {}
    for qid, q, p, label in zip(ds["query_id"], ds["q_ids"], ds["p_ids"], ds["label"], strict=True):
        g = found.setdefault(qid, Group(q, [], []))
        g.products.append(p)
        g.gains.append(gains[label])
    for qid, g in found.items():
        if max(g.gains) <= 0:
            raise FedshopError(f"{source}: query '{qid}' has no product with a positive gain (every one of its "
                               f"{len(g.gains)} products is judged irrelevant); a dual encoder cannot learn from it")
    return list(found.values())


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def embed(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Unit embeddings of token-id sequences (one forward pass)."""
    ids, mask = _pad(seqs, pad_id, device)
    return mean_pooled(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def listwise_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of the cross-entropy between each query's gain distribution over the candidates and the
    softmax of its cosine scores / temperature (q: queries x dim, p: candidates x dim, targets: queries x cand.)."""
    logp = F.log_softmax((q @ p.T).float() / temperature, dim=-1)
    w = targets / targets.sum(dim=1, keepdim=True)
    return -(w * logp).sum(dim=1).mean()


def batch_targets(batch: list[Group]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct products of a batch of groups and each query's gain on each of them (0: an in-batch negative)."""
    index: dict[tuple[int, ...], int] = {}
    products: list[list[int]] = []
    cells: list[tuple[int, int, float]] = []
    for b, g in enumerate(batch):
        for p, gain in zip(g.products, g.gains, strict=True):
            j = index.setdefault(tuple(p), len(products))
            if j == len(products):
                products.append(p)
            cells.append((b, j, gain))
    targets = torch.zeros(len(batch), len(products))
    for b, j, gain in cells:
        targets[b, j] = max(float(targets[b, j]), gain)
    return products, targets


@dataclass
class _Run:
    """One local training run's moving parts."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    params: list[torch.nn.Parameter]
    pad: int
    device: torch.device

    def step(self) -> None:
        """Optimiser and schedule step; gradients cleared."""
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


@register_task("retrieval")
class RetrievalTask(RelevanceTask):
    """Dual encoder over (query, product text) pairs graded by ESCI gains: the relevance task's data, built-in
    marketplace, judged test set and gains; its own model, loss, evaluation and scorer."""

    serves_as = "retriever"

    def check(self) -> None:
        """Pairs are needed; a query's judged products stay together."""
        super().check()
        if self.cfg.partition.name == "dirichlet":
            raise FedshopError("partition=dirichlet deals rows out by label, which splits a query's judged products "
                               "across merchants (a merchant may get only its irrelevant ones); for data.task="
                               "retrieval use partition=iid (whole queries) or natural (a merchant column)")

    def build_model(self, labels: list[str], seed: int) -> torch.nn.Module:
        """The bi-encoder as pretrained (LoRA: its adapters on top, nothing else trains)."""
        finetune = replace(self.cfg.finetune, modules_to_save=[])
        return M.with_finetune(M.build_encoder(self.cfg.model, seed), finetune, seed)

    def tokenize(self, ds: datasets.Dataset, wb: Workbench) -> datasets.Dataset:
        """Query and product token ids apart (q_ids, p_ids), with label and query_id."""
        tok, max_length = wb.tokenizer, self.cfg.train.max_length

        def enc(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
            return {"q_ids": tok(batch["text"], truncation=True, max_length=max_length)["input_ids"],
                    "p_ids": tok(batch["text_pair"], truncation=True, max_length=max_length)["input_ids"]}

        drop = [c for c in ds.column_names if c not in {"label", "query_id"}]
        key = f"fedshop-dual-v1|{ds._fingerprint}|{tok.name_or_path}|{len(tok)}|{max_length}"
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
        return ds.map(enc, batched=True, remove_columns=drop, new_fingerprint=fingerprint)

    def save(self, wb: Workbench, out_dir: Path, adapter_dir: Path | None = None) -> None:
        """A sentence-embedding directory: the merged encoder, its tokenizer, mean pooling and normalisation."""
        super().save(wb, out_dir, adapter_dir)
        st = "sentence_transformers.models."
        (out_dir / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"}], indent=2))
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        (out_dir / "2_Normalize").mkdir(exist_ok=True)
        dim = int(json.loads((out_dir / "config.json").read_text())["hidden_size"])  # as saved, merged once
        (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False,
             "pooling_mode_max_tokens": False}, indent=2))
        (out_dir / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": self.cfg.train.max_length, "do_lower_case": False}, indent=2))

    def num_records(self, ds: datasets.Dataset) -> int:
        """A record is one query with its judged products (what privacy=example protects)."""
        return len(set(ds["query_id"]))

    def train(self, wb: Workbench, ds: datasets.Dataset, epochs: int, seed: int, proximal_mu: float = 0.0,
              desc: str = "train", dp: RecordDP | None = None) -> dict[str, float]:
        """Fine-tune the encoder in place: train.batch_size queries a step with all their judged products (under
        `dp`, DP-SGD over Poisson batches of records, each scored against its own products only)."""
        t0, tc, model = time.perf_counter(), self.cfg.train, wb.model
        T.set_seed(seed)
        device = T.pick_device(tc.device)
        model.to(device)
        model.train()
        power = self.cfg.retrieval.gain_power  # the loss's target: gain ** power (1: the ESCI gains as they are)
        groups = groups_of(ds, [g ** power for g in wb.gains or []], "merchant training split")
        per_epoch = math.ceil(len(groups) / tc.batch_size)
        opt, params = T.optimizer(model, tc)
        sched = get_linear_schedule_with_warmup(opt, math.ceil(tc.warmup_ratio * epochs * per_epoch),
                                                max(1, epochs * per_epoch))
        pad = int(wb.tokenizer.pad_token_id or 0)
        run = _Run(model, opt, sched, params, pad, device)
        if dp is not None:
            loss = self._train_private(run, groups, epochs, seed, dp)
        else:
            loss = self._train_batches(run, groups, epochs, seed, proximal_mu, desc)
        model.to("cpu")
        return {keys.TRAIN_LOSS: loss, keys.NUM_EXAMPLES: len(ds), keys.TRAIN_SECONDS: time.perf_counter() - t0}

    def _train_batches(self, run: _Run, groups: list[Group], epochs: int, seed: int, proximal_mu: float,
                       desc: str) -> float:
        """Ordinary training: shuffled batches of queries, in-batch negatives, FedProx term; the mean loss."""
        tc = self.cfg.train
        anchor = [p.detach().clone() for p in run.params] if proximal_mu > 0 else []
        rng = np.random.default_rng(seed)
        total, seen = 0.0, 0
        for epoch in range(epochs):
            order = rng.permutation(len(groups))
            for start in tqdm(range(0, len(groups), tc.batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                              disable=None if tc.progress else True, leave=False, mininterval=1.0):
                batch = [groups[i] for i in order[start:start + tc.batch_size]]
                loss = self._step_loss(run.model, batch, run.pad, run.device)
                total, seen = total + float(loss.detach()) * len(batch), seen + len(batch)
                if anchor:
                    loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(run.params, anchor,
                                                                                              strict=True))
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(run.params, tc.grad_clip)
                run.step()
        return total / max(seen, 1)

    def _train_private(self, run: _Run, groups: list[Group], epochs: int, seed: int, dp: RecordDP) -> float:
        """DP-SGD on records: each step a Poisson sample (rate 1 / steps-per-epoch), every record's gradient of
        its own loss clipped to C, N(0, (zC)^2) added to the sum, divided by the expected batch size; the
        steps join `dp.history` for the merchant's accountant. The mean loss of the sampled records."""
        rate, steps = dp_sample_rate(len(groups), self.cfg.train.batch_size), \
            dp_steps(len(groups), self.cfg.train.batch_size, epochs)
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        expected = rate * len(groups)
        total, seen = 0.0, 0
        for _ in range(steps):
            batch = [g for g, take in zip(groups, rng.random(len(groups)) < rate, strict=True) if take]
            summed, loss_sum = self.clipped_sum(run.model, batch, dp.clipping_norm, run.pad, run.device, run.params)
            total, seen = total + loss_sum, seen + len(batch)
            for p, g in zip(run.params, summed, strict=True):
                noise = torch.normal(0.0, dp.noise_multiplier * dp.clipping_norm, size=p.shape, generator=gen)
                p.grad = ((g + noise.to(g.device)) / expected).to(p.dtype)
            run.step()
        dp.history.append((float(dp.noise_multiplier), float(rate), int(steps)))
        return total / max(seen, 1)

    def clipped_sum(self, model: torch.nn.Module, records: list[Group], clip: float, pad: int,
                    device: torch.device, params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], float]:
        """The sum over records of each record's gradient clipped to L2 norm `clip`, and the summed loss. A
        record's loss is its query against its own judged products only (no in-batch negatives), so it depends
        on that record alone and removing it changes the sum by at most `clip`."""
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        loss_sum = 0.0
        for g in records:
            vecs = embed(model, [g.query, *g.products], pad, device)
            loss = listwise_loss(vecs[:1], vecs[1:], torch.tensor([g.gains], device=device), self.temperature)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [torch.zeros_like(p) if x is None else x.float() for p, x in zip(params, grads, strict=True)]
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in flat))
            factor = min(1.0, clip / (norm + 1e-12))
            for acc, x in zip(summed, flat, strict=True):
                acc.add_(x, alpha=factor)
            loss_sum += float(loss.detach())
        return summed, loss_sum

    def _step_loss(self, model: torch.nn.Module, batch: list[Group], pad: int, device: torch.device) -> torch.Tensor:
        products, targets = batch_targets(batch)
        with T.autocast(device):
            vecs = embed(model, [g.query for g in batch] + products, pad, device)
        return listwise_loss(vecs[:len(batch)], vecs[len(batch):], targets.to(device), self.temperature)

    @property
    def temperature(self) -> float:
        """The softmax temperature of the listwise loss (retrieval.temperature)."""
        return float(self.cfg.retrieval.temperature)

    @torch.no_grad()
    def evaluate(self, wb: Workbench, ds: datasets.Dataset) -> dict[str, float]:
        """On a split (a merchant's validation split): the listwise loss over each query's own products and their
        nDCG@10 by cosine."""
        if len(ds) == 0:
            return {"loss": 0.0, "ndcg@10": 0.0, keys.NUM_EXAMPLES: 0}
        groups = groups_of(ds, wb.gains or [], "evaluation split")
        seqs = [s for g in groups for s in (g.query, *g.products)]
        vecs = self.embed_all(wb, seqs)
        losses, scores, at = [], [], 0
        for g in groups:
            q, p = vecs[at:at + 1], vecs[at + 1:at + 1 + len(g.products)]
            at += 1 + len(g.products)
            scores += (p @ q[0]).tolist()
            losses.append(float(listwise_loss(q, p, torch.tensor([g.gains]), self.temperature)))
        qids = [str(i) for i, g in enumerate(groups) for _ in g.gains]
        gains = [x for g in groups for x in g.gains]
        return {"loss": float(np.mean(losses)), "ndcg@10": ndcg_at_k(qids, scores, gains), keys.NUM_EXAMPLES: len(ds)}

    @torch.no_grad()
    def embed_all(self, wb: Workbench, seqs: list[list[int]]) -> torch.Tensor:
        """Unit embeddings of token-id sequences, train.eval_batch_size a pass, in order."""
        wb.model.eval()
        pad, step, device = int(wb.tokenizer.pad_token_id or 0), self.cfg.train.eval_batch_size, torch.device("cpu")
        return torch.cat([embed(wb.model, seqs[i:i + step], pad, device).float() for i in range(0, len(seqs), step)])

    def evaluation(self, wb: Workbench, test_raw: datasets.Dataset) -> HeldOut:
        """Retrieval from the whole judged catalog (built-in marketplace), else each test query's own products."""
        return RetrievalEvaluation(self, wb, test_raw)

    def scorer(self, model_dir: Path) -> PairScorer:
        """The saved encoder's cosine of (query, title) pairs."""
        encoder = Encoder(model_dir, self.cfg.train.max_length)
        return lambda queries, titles: (encoder.encode(queries) * encoder.encode(titles)).sum(axis=1)


class RetrievalEvaluation:
    """The held-out set: judged pairs (nDCG@10 of each query's own products, loss), and on the built-in marketplace
    every test query retrieving from the whole catalog (nDCG@10, MRR, recall@10) and the hard queries."""

    def __init__(self, task: RetrievalTask, wb: Workbench, test_raw: datasets.Dataset) -> None:
        self.task, self.wb, self.cfg = task, wb, task.cfg
        self.pairs = task.tokenize(test_raw, wb)
        self.num_examples = len(self.pairs)
        self.groups = groups_of(self.pairs, wb.gains or [], "held-out test set")
        self.judged = task.judged()
        query_ids = list(dict.fromkeys(self.pairs["query_id"]))
        n = self.cfg.eval.round_queries
        chosen = None if n is None or n >= len(query_ids) else set(
            sorted(query_ids, key=lambda q: D.unit_hash(self.cfg.seed, "eval-round", q))[:n])
        self.round_queries = [i for i, q in enumerate(query_ids) if chosen is None or q in chosen]
        self.round_pairs = self.pairs if chosen is None else self.pairs.select(
            [i for i, q in enumerate(self.pairs["query_id"]) if q in chosen])
        self._refs: References | None = None

    def describe(self) -> dict[str, Any]:
        """results.json's `evaluation`: what is scored, per round and at the end."""
        out: dict[str, Any] = {"test_examples": self.num_examples, "test_queries": len(self.groups),
                               "round_queries": len(self.round_queries),
                               "round_examples": len(self.round_pairs),
                               "per_round": "subset" if len(self.round_queries) < len(self.groups) else "full",
                               "final": "full", "ranker": "dual encoder: cosine over the whole catalog"}
        if self.judged is not None:
            out.update(catalog_products=len(self.judged.catalog), hard_queries=len(self.judged.hard))
        return out

    def refs(self) -> References | None:
        """The catalog's judgements and reference rankers (first use; None without a judged catalog)."""
        if self._refs is None and self.judged is not None:
            self._refs = references(self.cfg, self.judged, self.wb.labels, self.wb.gains or [])
        return self._refs

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Retrieval alone (the reference bi-encoder) and keyword TF-IDF on the catalog ({} without one)."""
        refs = self.refs()
        return {} if refs is None else refs.baselines

    def _encode(self, model: torch.nn.Module, texts: list[str]) -> np.ndarray:
        return encode_texts(model, self.wb.tokenizer, texts, self.cfg.train.max_length, self.cfg.train.eval_batch_size)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, full: bool) -> dict[str, Any]:
        """The model's metrics on the round subset of queries, or (full) on all of them; the hard queries always."""
        model.eval()
        chosen = list(range(len(self.groups))) if full else self.round_queries
        pairs = self.task.evaluate(replace(self.wb, model=model), self.pairs if full else self.round_pairs)
        out: dict[str, Any] = {**pairs, "eval": "full" if full else "subset"}
        refs = self.refs()
        if refs is not None and self.judged is not None:
            queries = [self.judged.queries[i] for i in chosen]
            sims = self._encode(model, queries) @ self._encode(model, refs.titles).T
            out.update(catalog_ranking(top_k(sims, 10), refs.gains[chosen], refs.exact[chosen]))
            out.update(hard_first(self.judged, lambda q, t: (self._encode(model, q) * self._encode(model, t)
                                                             ).sum(axis=1)))
        return out
