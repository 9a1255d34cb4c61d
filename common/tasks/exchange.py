"""The exchanged state: which part of a model travels between the server and the merchants, and back.

Every other module goes through these functions: the server's initial arrays, the spec it validates replies
against, the merchant's load and extract, checkpoints and the final model. The rule: every entry of the
model's state_dict except frozen parameters (requires_grad=False). A plain fine-tuned model exchanges all
its weights; a model whose base is frozen (adapters) exchanges only what trains. A part a merchant keeps to
itself (a personal head) would be one more rule here, read from conf/.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from common.run.errors import FedshopError


def exchanged_names(model: torch.nn.Module) -> list[str]:
    """The state_dict names that travel, in state_dict order."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return [name for name in model.state_dict() if name not in frozen]


def extract(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The exchanged state as name -> numpy array (CPU copies)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in exchanged_names(model)}


def load(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load the exchanged state into the model; the names and shapes must be exactly the exchanged ones."""
    state = model.state_dict()
    names = exchanged_names(model)
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or extra:
        raise FedshopError(f"arrays do not fit the exchanged state: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise FedshopError(f"arrays do not fit the exchanged state: {k} has shape {v.shape}, expected "
                               f"{tuple(state[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, strict=False)


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of what must be identical everywhere because it never travels: the model's architecture and
    labels (its config), the adapter setup, and every frozen tensor (name, dtype, shape and bytes)."""
    from peft.peft_model import PeftModel

    h = hashlib.sha256()
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(base, "config", None)
    h.update(config.to_json_string(use_diff=False).encode() if config is not None else b"")
    if isinstance(model, PeftModel):
        # sets (target_modules) in a fixed order: str() of a set follows the process's hash seed
        h.update(json.dumps({k: v.to_dict() for k, v in model.peft_config.items()}, sort_keys=True,
                            default=lambda o: sorted(o) if isinstance(o, set | frozenset) else str(o)).encode())
    exchanged = set(exchanged_names(model))
    for name, tensor in model.state_dict().items():
        if name not in exchanged:
            array = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{array.dtype}|{tuple(array.shape)}".encode())
            h.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return h.hexdigest()[:16]
