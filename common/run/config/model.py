"""conf/model and conf/finetune: which model is fine-tuned, and which of its parameters train."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from common.run.config._check import _check


@dataclass
class ModelConfig:
    """Which model to fine-tune; tiny_* describe the random-init test model."""

    name: str = MISSING  # minilm | tiny | local
    path: str | None = None
    tiny_hidden_size: int | None = None
    tiny_layers: int | None = None
    tiny_heads: int | None = None
    tiny_intermediate_size: int | None = None


@dataclass
class FinetuneConfig:
    """Which parameters train (conf/finetune): all of them, or LoRA adapters (peft) over a frozen base."""

    name: str = MISSING  # full | lora
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def validate_model(m: ModelConfig) -> None:
    """The model's name, and its directory when model=local."""
    _check(m.name in {"minilm", "tiny", "local"}, "model.name", m.name, "minilm|tiny|local")
    _check(m.name != "local" or bool(m.path), "model.path", m.path,
           "a local Hugging Face model directory when model=local")


def validate_finetune(f: FinetuneConfig) -> None:
    """The fine-tuning mode, and LoRA's rank, alpha, dropout and target modules when finetune=lora."""
    _check(f.name in {"full", "lora"}, "finetune.name", f.name, "full|lora")
    if f.name == "lora":
        _check(f.rank is not None and f.rank > 0, "finetune.rank", f.rank, "> 0 with finetune=lora")
        _check(f.alpha is not None and f.alpha > 0, "finetune.alpha", f.alpha, "> 0 with finetune=lora")
        _check(f.dropout is not None and 0.0 <= f.dropout < 1.0, "finetune.dropout", f.dropout,
               "a fraction in [0, 1) with finetune=lora")
        _check(bool(f.target_modules), "finetune.target_modules", f.target_modules,
               "module names to adapt with finetune=lora")
