"""`python -m client.supernode ...`: Flower's `flower-supernode`, polling the SuperLink faster.

Flower 1.39's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message; this entry point caps that
sleep at FEDSHOP_NODE_POLL_INTERVAL seconds (default 0.2) and retries object pulls sooner (patches 3 and 4 in
client/flower_patches.py), and otherwise runs Flower's own SuperNode unchanged, with the same arguments.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Patch the SuperNode's poll loop, then hand over to Flower's CLI entry point."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from client import flower_patches

    flower_patches.apply_supernode(float(os.environ.get("FEDSHOP_NODE_POLL_INTERVAL", "0.2")))
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
