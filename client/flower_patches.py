"""Every change fedshop makes to Flower on the merchant side, in one place.

Written for flwr 1.39: each patch calls `require()` and refuses another release loudly, and each has a canary
test (tests/test_flower_patches.py) that fails the day upstream changes the behaviour it works around, so it
can be dropped. Nothing changes on import; the entry points apply what they need:

- the ClientApp (its lifespan, in whatever process runs it: a Ray actor, a forked task process):
  `apply_clientapp()`
  1. zero_safe_clipping: Flower's DP clipping (fixedclipping_mod, LocalDpMod) divides by the update's norm;
     an update of exactly zero raises ZeroDivisionError and fails the round.
  2. whole_secret_masks: Flower's secaggplus_mod seeds every mask with a 32-bit fold of the shared secret;
     masks come from AES-256-CTR keyed by the whole secret instead (the server does the same).
- `python -m client.supernode`: `apply_supernode(cap)`
  3. fast_node_polling: the SuperNode sleeps a hard-coded 3 s whenever a pull finds no message, so each
     message waits 1.5 s on average before a merchant sees it; the sleep is capped at `cap` seconds.
  4. fast_object_pulls: a task that asks for its message's objects before the SuperNode has them backs off
     1 s, then 2 s (Flower's PULL_INITIAL_BACKOFF); the backoff starts at 50 ms and is capped at 0.1 s.
- `python -m client.executor`: `use_executor(executor)`
  5. forkserver_executor: Flower's SuperExec loop builds its executor with `get_executor`; fedshop's runs each
     task in a process forked from a warm fork server instead of a cold `flwr-clientapp` process.
- each forked task process (client/executor/task.py): `apply_task()` (4 again, in the fresh process).
"""

from __future__ import annotations

import importlib
import time
import types
from typing import Any

import flwr.supercore.differential_privacy as flower_dp
from flwr.supercore.inflatable import inflatable_utils

from common.protocol import flower_version, privacy_math

PULL_INITIAL_BACKOFF = 0.05
PULL_BACKOFF_CAP = 0.1
# The module (the package re-exports a function of the same name) whose mask generator is replaced.
flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
PULLS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)

# Flower's originals, kept for the canary tests (captured, not changed, on import).
FLOWER_CLIP = flower_dp.clip_inputs_inplace
FLOWER_MOD_MASKS = flower_mod.pseudo_rand_gen
FLOWER_PULL_DEFAULTS = [dict(fn.__kwdefaults__ or {}) for fn in PULLS]


def require(patch: str) -> None:
    """Refuse to patch a Flower release the patch was not written for."""
    flower_version.require(patch, "client/flower_patches.py")


def apply_clientapp() -> None:
    """Patches 1 and 2, for the process that runs the ClientApp; idempotent."""
    require("zero_safe_clipping")
    flower_dp.clip_inputs_inplace = privacy_math.clip_inputs_inplace
    flower_dp.adaptive_clip_inputs_inplace = privacy_math.adaptive_clip_inputs_inplace
    require("whole_secret_masks")
    setattr(flower_mod, "pseudo_rand_gen", privacy_math.mask)  # noqa: B010 (mypy sees only a ModuleType)


def _capped_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the `time` module whose sleep() never waits longer than `cap` seconds."""
    attrs = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    attrs["sleep"] = lambda s: time.sleep(min(float(s), cap))
    return types.SimpleNamespace(**attrs)


def apply_supernode(cap: float) -> None:
    """Patches 3 and 4, for the SuperNode process."""
    from flwr.supernode import start_client_internal

    require("fast_node_polling")
    if not isinstance(getattr(start_client_internal, "time", None), types.ModuleType | types.SimpleNamespace):
        raise RuntimeError("fedshop: flwr.supernode.start_client_internal has no `time` module to cap")
    start_client_internal.time = _capped_time(cap)  # type: ignore[assignment]
    apply_task()


def apply_task() -> None:
    """Patch 4 (object pulls retried sooner), for a process that pulls a task's objects."""
    require("fast_object_pulls")
    for fn in PULLS:
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"flwr {fn.__qualname__} has no initial_backoff/backoff_cap keyword defaults")
        fn.__kwdefaults__ = {**defaults, "initial_backoff": PULL_INITIAL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP}


def use_executor(executor: Any) -> None:
    """Patch 5: Flower's SuperExec loop (run_superexec) runs its tasks with `executor`."""
    from flwr.supercore.superexec import run_superexec

    require("forkserver_executor")
    if not hasattr(run_superexec, "get_executor"):
        raise RuntimeError("fedshop: this Flower has no flwr.supercore.superexec.run_superexec.get_executor; "
                           "use deploy.executor=subprocess")
    run_superexec.get_executor = lambda *args, **kwargs: executor
