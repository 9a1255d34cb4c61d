"""What a merchant keeps between rounds, in Flower's Context.state (a RecordDict the node keeps for the run).

Flower hands every message of a run the same Context on that node: in simulation it lives in the engine, in
deployment the SuperNode keeps it and sends it to (and takes it back from) the task process of each message,
so it survives the fork-server executor's per-message processes. The process-wide caches in client/ only
save work (a tokenised shard); anything a later round must see goes here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from common.run.errors import FedshopError

STATE_RECORD = "fedshop-merchant"


@dataclass
class MerchantState:
    """A merchant's own record of the run so far."""

    rounds_trained: int = 0  # training rounds done in this run
    last_round: int = 0  # the server round it last trained in
    examples_trained: int = 0  # training examples seen, summed over epochs and rounds

    @classmethod
    def load(cls, state: RecordDict) -> MerchantState:
        """The state saved in a Context.state (a fresh one when the run has just started)."""
        record = state.config_records.get(STATE_RECORD)
        if record is None:
            return cls()
        return cls(**{k: int(str(record[k])) for k in asdict(cls()) if k in record})

    def save(self, state: RecordDict) -> None:
        """Write this state into a Context.state."""
        state[STATE_RECORD] = ConfigRecord(dict(asdict(self)))

    def trained(self, server_round: int, examples: int) -> MerchantState:
        """The state after one more training round."""
        return MerchantState(self.rounds_trained + 1, server_round, self.examples_trained + examples)


BUDGET_RECORD = "fedshop-record-dp"


@dataclass
class RecordBudget:
    """What a merchant has spent on its own records under privacy=example: Opacus's accountant history (one
    (noise multiplier, sample rate, steps) entry per round it trained) and the epsilon after each such round.

    It is kept twice: in Context.state (the run's node state) and in a JSON file in the merchant's run
    directory, which outlives the node: a restarted merchant or a resumed server continues from the longer.
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)  # {"round", "epsilon", "noise_multiplier"}

    @classmethod
    def load(cls, state: RecordDict, path: Path | None) -> RecordBudget:
        """The longer of the budget in Context.state and the one in `path` (an empty one when neither exists)."""
        found = []
        record = state.config_records.get(BUDGET_RECORD)
        if record is not None:
            found.append(cls._from_json(str(record["json"]), "Context.state"))
        if path is not None and path.exists():
            found.append(cls._from_json(path.read_text(), str(path)))
        return max(found, key=lambda b: sum(n for _, _, n in b.history), default=cls())

    @classmethod
    def _from_json(cls, text: str, where: str) -> RecordBudget:
        try:
            doc = json.loads(text)
            return cls([(float(z), float(q), int(n)) for z, q, n in doc["history"]], list(doc["rounds"]))
        except (ValueError, KeyError, TypeError) as err:
            raise FedshopError(f"{where}: not a record-level privacy budget ({err}); it must not be edited") from err

    def save(self, state: RecordDict, path: Path | None) -> None:
        """Write into Context.state and (atomically) to `path`."""
        text = json.dumps({"history": self.history, "rounds": self.rounds}, indent=1)
        state[BUDGET_RECORD] = ConfigRecord({"json": text})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
