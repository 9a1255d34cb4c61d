"""What a merchant keeps between rounds, in Flower's Context.state (a RecordDict the node keeps for the run).

Flower hands every message of a run the same Context on that node: in simulation it lives in the engine, in
deployment the SuperNode keeps it and sends it to (and takes it back from) the task process of each message,
so it survives the fork-server executor's per-message processes. The process-wide caches in client/ only
save work (a tokenised shard); anything a later round must see goes here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flwr.app import ConfigRecord, RecordDict

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
