"""What one forked task process runs: Flower's `run_clientapp`, with object pulls retried sooner.

Flower's SuperNode makes a task acquirable before it has finished pulling the message's objects from the
SuperLink. A ClientApp started cold (6 s of imports) never notices; one forked from a warm server asks at once,
finds objects missing and backs off 1 s, then 2 s. Patch 4 of client/flower_patches.py shortens that backoff
in this fresh process.
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.supernode.runtime.run_clientapp import run_clientapp

# fedshop's own packages: they must come from the FAB the server sent, never from this process.
OWN_PACKAGES = frozenset({"client", "common", "server", "simulation"})


def run_task(**kwargs: Any) -> None:
    """Run one ClientApp task (kwargs as for flwr's run_clientapp) in this freshly forked process."""
    from client import flower_patches

    flower_patches.apply_task()
    # The app's modules are compiled once into the installed FAB's __pycache__, then read back by every later
    # task, even under PYTHONDONTWRITEBYTECODE (or the -B the fork server inherits): otherwise every task
    # compiles fedshop's modules from source again.
    sys.dont_write_bytecode = False
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    run_clientapp(**kwargs)
