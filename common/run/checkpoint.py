"""Atomic checkpoint IO: weights, round, strategy state, RNG states, config hash and history."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.run.errors import FedshopError

FORMAT_VERSION = 2  # 2: the base fingerprint (only the exchanged state is saved)


def config_hash(config_json: str) -> str:
    """Short stable hash of a canonical config JSON string."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a torch.save-safe form."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: Path, *, server_round: int, weights: dict[str, np.ndarray], config_json: str,
         strategy_state: dict[str, Any], history: list[dict[str, Any]], base_fingerprint: str) -> None:
    """Write one round's checkpoint atomically: the exchanged state (only what trains) and the fingerprint of the
    frozen base it belongs to."""
    import io

    payload = {
        "format": FORMAT_VERSION,
        "round": server_round,
        "weights": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
        "strategy_state": strategy_state,
        "rng": rng_state(),
        "config_hash": config_hash(config_json),
        "config_json": config_json,
        "history": history,
        "base_fingerprint": base_fingerprint,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, expected_config_json: str | None = None) -> dict[str, Any]:
    """Read a checkpoint, refusing corrupt files and ones written for another config."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise FedshopError(f"checkpoint {path}: corrupt or unreadable ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise FedshopError(f"checkpoint {path}: not a fedshop checkpoint of format {FORMAT_VERSION}")
    if expected_config_json is not None and payload["config_hash"] != config_hash(expected_config_json):
        raise FedshopError(f"checkpoint {path}: written for a different config (hash {payload['config_hash']} != "
                           f"{config_hash(expected_config_json)}); use a new run directory or the same config")
    payload["weights"] = {k: v.numpy() for k, v in payload["weights"].items()}
    return payload


def _rounds(directory: Path) -> list[Path]:
    """Round checkpoints in `directory`, oldest round first."""
    return sorted(directory.glob("round_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def latest(directory: Path) -> Path | None:
    """The checkpoint of the highest round in `directory`, if any."""
    found = _rounds(directory)
    return found[-1] if found else None


def prune(directory: Path, keep_last: int, also: set[int]) -> list[int]:
    """Delete the round checkpoints except the newest `keep_last` and the rounds in `also`; the rounds deleted."""
    found = _rounds(directory)
    gone = [p for p in found[:-keep_last] if int(p.stem.split("_")[1]) not in also]
    for path in gone:
        path.unlink(missing_ok=True)
    return [int(p.stem.split("_")[1]) for p in gone]


def best_round(history: list[dict[str, Any]], metric: str, mode: str) -> int:
    """The round whose server-side `metric` is best (max or min; the earliest on a tie)."""
    scored = [(int(r["round"]), float(v)) for r in history
              if isinstance(v := (r.get("server") or {}).get(metric), int | float)]
    if not scored:
        found = sorted({k for r in history for k in (r.get("server") or {})})
        raise FedshopError(f"checkpoint.best_metric={metric!r}: not a server-side metric of this run; it has {found}")
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda rv: (sign * rv[1], -rv[0]))[0]
