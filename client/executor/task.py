"""What one forked task process runs: Flower's `run_clientapp`, with object pulls retried sooner.

Flower's SuperNode makes a task acquirable before it has finished pulling the message's objects from
the SuperLink. A ClientApp started cold (6 s of imports) never notices; one forked from a warm server
asks at once, finds objects missing and backs off 1 s, then 2 s (Flower's PULL_INITIAL_BACKOFF). Here
the backoff starts at 50 ms and is capped at 0.1 s (a loopback request): the same retries, without the idle seconds.
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode.runtime.run_clientapp import run_clientapp

# fedshop's own packages: they must come from the FAB the server sent, never from this process.
OWN_PACKAGES = frozenset({"client", "common", "server", "simulation"})
PULL_INITIAL_BACKOFF = 0.05
PULL_BACKOFF_CAP = 0.1


def fast_object_pulls() -> None:
    """Shorten Flower's object-pull backoff (1 s doubling to 10 s) to PULL_INITIAL_BACKOFF..PULL_BACKOFF_CAP."""
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"flwr {fn.__qualname__} has no initial_backoff/backoff_cap keyword defaults")
        fn.__kwdefaults__ = {**defaults, "initial_backoff": PULL_INITIAL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP}


def run_task(**kwargs: Any) -> None:
    """Run one ClientApp task (kwargs as for flwr's run_clientapp) in this freshly forked process."""
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    fast_object_pulls()
    run_clientapp(**kwargs)
