"""Scores (query, product) pairs with a fedshop model directory, in fp32 or int8 form."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from common.run.config import compose
from common.run.errors import FedshopError
from common.tasks.encoder import mean_pooled
from common.tasks.model import LABELS_FILE
from common.tasks.registry import task_class

log = logging.getLogger(__name__)
FORMS = ("fp32", "int8", "onnx", "onnx-int8")
ONNX_DIR = "onnx"  # inside the model directory: model.onnx, model.int8.onnx (made on first use)


def model_version(model_dir: Path) -> str:
    """A short content hash of the model directory's config and weights (what /metrics and responses report)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in model_dir.iterdir() if p.suffix in {".json", ".safetensors", ".bin"}):
        with (model_dir / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def read_labels(model_dir: Path, gains: dict[str, float] | None,
                fallback: dict[str, float] | None = None) -> tuple[list[str], list[float]]:
    """Label names (fedshop_labels.json, else config.json's id2label) and each label's ranking gain: `gains`,
    else the directory's own, else `fallback` (serving.fallback_gains)."""
    path = model_dir / LABELS_FILE
    if path.is_file():
        doc = json.loads(path.read_text())
        task = str(doc.get("task", "relevance"))
        role = task_class(task).serves_as or "no ranker"
        if role != "reranker":
            raise FedshopError(f"serving.model_dir={model_dir}: a data.task={task} model ({role}), not a "
                               f"cross-encoder; a dual encoder is served as serving.model_dir=<dir> itself")
        labels = [str(x) for x in doc["labels"]]
        saved = doc.get("gains") or {}
    else:
        config = json.loads((model_dir / "config.json").read_text())
        labels = [str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))]
        saved = {}
    table = {**(fallback or {}), **saved, **(gains or {})}
    missing = [name for name in labels if name not in table]
    if missing:
        raise FedshopError(f"{model_dir}: no ranking gain for label(s) {missing}; set serving.gains")
    return labels, [float(table[name]) for name in labels]


class PairEncoder:
    """Tokenises (query, title) pairs like the tokenizer does, with each title's tokens cached.

    A catalog's titles repeat across requests, so only the query is tokenised per request; the pair is
    assembled as the tokenizer's own template ([CLS] query [SEP] title [SEP] for BERT), checked at start.
    A tokenizer with another template, or a batch with a pair longer than max_length (truncation), goes
    through the tokenizer itself.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, cache_size: int = 1_000_000) -> None:
        self.tokenizer, self.max_length, self.cache_size = tokenizer, max_length, cache_size
        self.cache: dict[str, list[int]] = {}
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        probe = tokenizer("a query", "a title", truncation=True, max_length=max_length)
        q, t = self._ids(["a query", "a title"])
        self.fast = (cls is not None and sep is not None and tokenizer.padding_side == "right"
                     and probe["input_ids"] == [cls, *q, sep, *t, sep]
                     and probe.get("token_type_ids") == [0] * (len(q) + 2) + [1] * (len(t) + 1))

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _tokenize(self, queries: list[str], titles: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(queries, titles, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    def __call__(self, queries: list[str], titles: list[str]) -> dict[str, np.ndarray]:
        """input_ids, token_type_ids and attention_mask (int64, padded to the longest pair)."""
        if not self.fast or not titles:
            return self._tokenize(queries, titles)
        new = [t for t in dict.fromkeys(titles) if t not in self.cache]
        if new:
            if len(self.cache) + len(new) > self.cache_size:
                self.cache.clear()
            self.cache.update(zip(new, self._ids(new), strict=True))
        distinct = list(dict.fromkeys(queries))
        query_ids = dict(zip(distinct, self._ids(distinct), strict=True))
        rows = [(query_ids[q], self.cache[t]) for q, t in zip(queries, titles, strict=True)]
        width = max(len(q) + len(t) + 3 for q, t in rows)
        if width > self.max_length:  # truncation needed: the tokenizer's rules
            return self._tokenize(queries, titles)
        cls, sep = int(self.tokenizer.cls_token_id), int(self.tokenizer.sep_token_id)
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (q, t) in enumerate(rows):
            n = len(q) + len(t) + 3
            ids[i, :n] = [cls, *q, sep, *t, sep]
            types[i, len(q) + 2:n] = 1
            mask[i, :n] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


class Ranker:
    """A loaded, warmed-up model: score(query, titles) -> expected relevance gain per title."""

    def __init__(self, model_dir: str | Path, form: str = "fp32", max_length: int = 64,
                 gains: dict[str, float] | None = None, fp32_layers: list[int] | tuple[int, ...] = (),
                 fallback_gains: dict[str, float] | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        if form not in FORMS:
            raise FedshopError(f"serving.form={form!r}: expected one of {', '.join(FORMS)}")
        if not (self.model_dir / "config.json").is_file():
            raise FedshopError(f"serving.model_dir={self.model_dir}: not a Hugging Face model directory "
                               f"(no config.json)")
        self.form, self.max_length = form, max_length
        self.fp32_layers = sorted(set(fp32_layers)) if form.endswith("int8") else []
        if fallback_gains is None:  # conf/'s own (serving.fallback_gains)
            fallback_gains = dict(compose([]).serving.fallback_gains)
        self.labels, gain_list = read_labels(self.model_dir, gains, fallback_gains)
        self.gains = torch.tensor(gain_list, dtype=torch.float32)
        self.gain_vector = self.gains.numpy()
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.model_dir)
            model = AutoModelForSequenceClassification.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise FedshopError(f"serving.model_dir={self.model_dir}: could not load: {exc}") from exc
        if model.config.num_labels != len(self.labels):
            raise FedshopError(f"{self.model_dir}: the model has {model.config.num_labels} outputs but "
                               f"{len(self.labels)} labels")
        layers = int(getattr(model.config, "num_hidden_layers", 0))
        bad = [i for i in self.fp32_layers if not 0 <= i < layers]
        if bad:
            raise FedshopError(f"serving.int8_fp32_layers={self.fp32_layers}: the model has layers 0..{layers - 1}")
        model.eval()
        self.session: Any = None
        if form.startswith("onnx"):
            self.onnx_path = export_onnx(self.model_dir, self.tokenizer, quantized=form == "onnx-int8",
                                         fp32_layers=self.fp32_layers)
            self.session = ort_session(self.onnx_path)
        if form == "int8":
            model = quantize_int8(model, self.fp32_layers)
        # An ONNX form scores with its session only; the torch weights are not kept in memory beside it.
        self.model: Any = None if self.session is not None else model
        mixed = "-fp32layers" + "_".join(map(str, self.fp32_layers)) if self.fp32_layers else ""
        self.version = f"{model_version(self.model_dir)}-{form}{mixed}"
        self.encode = PairEncoder(self.tokenizer, max_length)
        self._lock = threading.Lock()
        self.score("warm-up", ["warm-up product"])

    def probabilities(self, query: str, titles: list[str]) -> np.ndarray:
        """Label probabilities, one row per title (float32)."""
        return self.pair_probabilities([query] * len(titles), titles)

    def pair_probabilities(self, queries: list[str], titles: list[str]) -> np.ndarray:
        """Label probabilities of (queries[i], titles[i]) pairs, in one forward pass."""
        enc = self.encode(queries, titles)
        if self.session is not None:
            names = [i.name for i in self.session.get_inputs()]
            with self._lock:
                logits = self.session.run(["logits"], {k: enc[k] for k in names})[0]
        else:
            with self._lock, torch.inference_mode():
                logits = self.model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.float().numpy()
        # numpy, not torch: a torch op after an ONNX Runtime pass wakes torch's thread pool, which then
        # competes with ONNX Runtime's threads on a small machine (up to 8 ms at p99 on 2 cores).
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)

    def size_mb(self) -> float:
        """What this form's weights cost on disk, MB (the ONNX file, or the serialized state dict)."""
        if self.session is not None:
            return self.onnx_path.stat().st_size / 1e6
        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        return buf.tell() / 1e6

    def score(self, query: str, titles: list[str]) -> np.ndarray:
        """Expected gain Σ p(label)·gain(label) per title: the model score that ranking starts from."""
        return self.score_many([(query, titles)])[0]

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """score() of several (query, titles) requests, computed in one forward pass."""
        queries = [q for q, titles in requests for _ in titles]
        titles = [t for _, ts in requests for t in ts]
        gains = self.pair_probabilities(queries, titles) @ self.gain_vector if titles else np.zeros(0, np.float32)
        bounds = np.cumsum([len(ts) for _, ts in requests])[:-1]
        return list(np.split(gains, bounds))


def in_layers(name: str, layers: list[int]) -> bool:
    """Whether a module (torch) or node (ONNX export) name belongs to one of these encoder layers."""
    return any(re.search(rf"(^|[./])layer\.{i}([./]|$)", name) for i in layers)


def quantize_int8(model: torch.nn.Module, fp32_layers: list[int]) -> torch.nn.Module:
    """Dynamic int8 (per-output-channel weight scales) for every Linear outside the encoder layers kept fp32.

    Per-channel scales: 96.9% argmax agreement with fp32 on a MiniLM teacher against 94.7% with one scale
    per tensor, at the same speed. Keeping the most sensitive layers fp32 (chosen by serving.compress on
    unlabeled pairs) is what brings agreement to 99%: the error is not spread evenly over the layers.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not in_layers(n, fp32_layers)]
    return torch.ao.quantization.quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig),
                                                  dtype=torch.qint8)


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session over the exported graph with `threads` intra-op threads (default torch's count);
    with an explicit count its idle threads do not spin (they would take the cores from numpy and the HTTP
    server between passes: up to 8 ms at p99 on 2 cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise FedshopError("serving.form=onnx*: needs the onnxruntime package") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if threads is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _ByName(torch.nn.Module):
    """Positional inputs -> the model's keyword arguments (the exporter passes inputs by position); the output is
    a classifier's logits, or an encoder's mean-pooled, L2-normalised embedding (`pooled`)."""

    def __init__(self, model: torch.nn.Module, names: list[str], pooled: bool = False) -> None:
        super().__init__()
        self.model, self.names, self.pooled = model, names, pooled

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped classifier, or unit embeddings of the wrapped encoder."""
        kwargs = dict(zip(self.names, inputs, strict=True))
        out = self.model(**kwargs)
        if self.pooled:
            return mean_pooled(out.last_hidden_state, kwargs["attention_mask"])
        return out.logits


def export_onnx(model_dir: Path, tokenizer: PreTrainedTokenizerBase, quantized: bool,
                fp32_layers: list[int] | tuple[int, ...] = (), encoder: bool = False) -> Path:
    """<model_dir>/onnx/model.onnx (and model.int8[-fp32_<layers>].onnx: ONNX Runtime dynamic int8, per
    channel, the nodes of `fp32_layers` left fp32), made once; `encoder`: the dual encoder's graph, output
    "embedding" (mean-pooled, normalised), in encoder.onnx / encoder.int8*.onnx.

    Traced with eager attention on a padded batch: with SDPA and an unpadded example the exporter records
    a graph that ignores the attention mask, and padded requests then score wrongly.
    """
    out = model_dir / ONNX_DIR
    stem = "encoder" if encoder else "model"
    suffix = "-fp32_" + "_".join(map(str, sorted(fp32_layers))) if fp32_layers else ""
    fp32, int8 = out / f"{stem}.onnx", out / f"{stem}.int8{suffix}.onnx"
    target = int8 if quantized else fp32
    if target.is_file():
        return target
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise FedshopError(f"{out}: cannot write the ONNX export there ({exc}); export on a writable copy "
                           f"(python -m serving.compress)") from exc
    if not fp32.is_file():
        _export_fp32(model_dir, tokenizer, fp32, encoder)
    if quantized:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        keep = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node
                if in_layers(n.name, list(fp32_layers))]
        tmp = out / f".{stem}.int8.{os.getpid()}.onnx"
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep)
        os.replace(tmp, int8)
    log.info("exported %s", target)
    return target


def _export_fp32(model_dir: Path, tokenizer: PreTrainedTokenizerBase, target: Path, encoder: bool) -> None:
    """Trace the classifier (or encoder) to `target`, written atomically."""
    if encoder:  # no pooler: the dual encoder saves none and mean-pools the token states
        try:
            model = AutoModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(model_dir, attn_implementation="eager")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
    model.eval()
    if encoder:
        enc = tokenizer(["a product title", "a much longer product title about shoes"], padding=True,
                        return_tensors="pt")
    else:
        enc = tokenizer(["a query", "a much longer query about shoes"], ["a product title", "title"], padding=True,
                        return_tensors="pt")
    names = list(enc.keys())
    output = "embedding" if encoder else "logits"
    tmp = target.parent / f".{target.stem}.{os.getpid()}.onnx"
    torch.onnx.export(_ByName(model, names, pooled=encoder), tuple(enc[k] for k in names), str(tmp),
                      input_names=names, output_names=[output],
                      dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, output: {0: "batch"}},
                      opset_version=17, dynamo=False)
    os.replace(tmp, target)
