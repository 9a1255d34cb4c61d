"""The Flower release fedshop's patches (server/flower_patches.py, client/flower_patches.py) were written for."""

from __future__ import annotations

import flwr

WRITTEN_FOR = "1.39."


def require(patch: str, module: str) -> None:
    """Refuse to apply `patch` (defined in `module`) to a Flower release it was not written for."""
    if not flwr.__version__.startswith(WRITTEN_FOR):
        raise RuntimeError(f"fedshop's Flower patch '{patch}' was written for flwr {WRITTEN_FOR}x, but flwr "
                           f"{flwr.__version__} is installed: check whether it is still needed (its canary test in "
                           f"tests/test_flower_patches.py says) and update {module}")
