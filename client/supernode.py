"""`python -m client.supernode ...`: Flower's `flower-supernode`, polling the SuperLink faster.

Flower 1.39's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message, so every message
waits 1.5 s on average before a merchant even sees it (twice per round: train and evaluate). This
entry point caps that sleep at FEDSHOP_NODE_POLL_INTERVAL seconds (default 0.2), retries object pulls
sooner (client/executor/task.py) and otherwise runs Flower's own SuperNode unchanged, with the same
command-line arguments.
"""

from __future__ import annotations

import os
import sys
import time
import types


def _fast_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the `time` module whose sleep() never waits longer than `cap` seconds."""
    attrs = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    attrs["sleep"] = lambda s: time.sleep(min(float(s), cap))
    return types.SimpleNamespace(**attrs)


def main() -> None:
    """Patch the SuperNode's poll loop, then hand over to Flower's CLI entry point."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from client.executor.task import fast_object_pulls

    cap = float(os.environ.get("FEDSHOP_NODE_POLL_INTERVAL", "0.2"))
    if isinstance(getattr(start_client_internal, "time", None), types.ModuleType):
        start_client_internal.time = _fast_time(cap)  # type: ignore[assignment]
    else:
        print("fedshop: flwr.supernode.start_client_internal has no `time`; polling stays at Flower's default",
              file=sys.stderr)
    fast_object_pulls()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
