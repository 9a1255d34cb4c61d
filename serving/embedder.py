"""The dual encoder as the service runs it: query and catalog texts to unit vectors, in fp32 or a compressed form.

A fedshop `task=retrieval` directory (or any sentence-embedding directory) is served as an `Embedder`; the same
forms as the cross-encoder: fp32, torch dynamic int8, ONNX Runtime fp32 and int8 (exported to <model_dir>/onnx/
on first use). A compressed form must agree with fp32 on the top 10 of the catalog (`top_agreement`) before the
service takes it (serving.min_agreement).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common.run.errors import FedshopError
from common.tasks.encoder import mean_pooled
from common.tasks.model import LABELS_FILE
from common.tasks.registry import task_class
from serving.ranker import FORMS, export_onnx, model_version, ort_session, quantize_int8


def model_role(model_dir: str | Path) -> str:
    """What a model directory serves as: "retriever" (a dual encoder / sentence-embedding directory) or
    "reranker" (a cross-encoder); raises FedshopError for anything else."""
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FedshopError(f"serving.model_dir={path}: not a Hugging Face model directory (no config.json)")
    labels = path / LABELS_FILE
    if labels.is_file():
        task = str(json.loads(labels.read_text()).get("task", "relevance"))
        role = task_class(task).serves_as
        if role not in {"retriever", "reranker"}:
            raise FedshopError(f"serving.model_dir={path}: a data.task={task} model, which ranks nothing")
        return role
    return "retriever" if (path / "modules.json").is_file() else "reranker"


def load_encoder(model_dir: Path) -> Any:
    """The encoder without a pooler where the architecture has that switch (the dual encoder saves none and only
    mean-pools the token states), in eval mode."""
    try:
        return AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    except TypeError:
        return AutoModel.from_pretrained(model_dir).eval()


class Embedder:
    """A loaded, warmed-up dual encoder: encode(texts) -> unit vectors (float32, one row per text)."""

    def __init__(self, model_dir: str | Path, form: str = "fp32", max_length: int = 64,
                 fp32_layers: list[int] | tuple[int, ...] = (), threads: int | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        if form not in FORMS:
            raise FedshopError(f"serving.form={form!r}: expected one of {', '.join(FORMS)}")
        self.form, self.max_length = form, max_length
        self.fp32_layers = sorted(set(fp32_layers)) if form.endswith("int8") else []
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.model_dir)
            model = load_encoder(self.model_dir)
        except (OSError, ValueError) as exc:
            raise FedshopError(f"serving.model_dir={self.model_dir}: could not load an encoder: {exc}") from exc
        self.session: Any = None
        if form.startswith("onnx"):
            self.onnx_path = export_onnx(self.model_dir, self.tokenizer, quantized=form == "onnx-int8",
                                         fp32_layers=self.fp32_layers, encoder=True)
            self.session = ort_session(self.onnx_path, threads)
            self.input_names = [i.name for i in self.session.get_inputs()]
        self.model: Any = None if self.session is not None else (
            quantize_int8(model, self.fp32_layers) if form == "int8" else model)
        mixed = "-fp32layers" + "_".join(map(str, self.fp32_layers)) if self.fp32_layers else ""
        self.version = f"{model_version(self.model_dir)}-{form}{mixed}"
        self.dim = int(model.config.hidden_size)
        self._lock = threading.Lock()
        self.encode(["warm-up"])

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit vectors of texts, batch_size texts a forward pass."""
        out = [self._pass(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def _pass(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="np")
        if self.session is not None:  # an ONNX Runtime session runs concurrent calls safely: no lock
            feed = {k: np.asarray(enc[k], dtype=np.int64) for k in self.input_names}
            return np.asarray(self.session.run(["embedding"], feed)[0], dtype=np.float32)
        tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in enc.items()}
        with self._lock, torch.inference_mode():
            states = self.model(**tensors).last_hidden_state
        return mean_pooled(states, tensors["attention_mask"]).float().numpy()


def top_agreement(form_q: np.ndarray, form_p: np.ndarray, ref_q: np.ndarray, ref_p: np.ndarray,
                  k: int = 10) -> float:
    """Mean share of the reference's exact top k (fp32 queries against fp32 catalog vectors) that the compressed
    form's exact top k also holds, over the query rows."""
    k = min(k, len(ref_p))
    if k == 0 or len(ref_q) == 0:
        return 1.0
    ref = np.argpartition(-(ref_q @ ref_p.T), k - 1, axis=1)[:, :k]
    got = np.argpartition(-(form_q @ form_p.T), k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref, got, strict=True)]))
