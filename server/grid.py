"""A Grid that knows which merchant each node is, so that sampling and results are reproducible.

Flower gives nodes random ids, so `random.sample(grid.get_node_ids(), k)` picks different merchants
on every run even with the same seed. This wrapper asks every new node once for its merchant index
(a `query` message) and lists nodes in merchant order: the same seed then samples the same merchants.
In a simulation the launcher knows every merchant already (a Roster): no node is asked.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.protocol import wire

log = logging.getLogger(__name__)
FIRST_POLL = 0.01  # seconds before the first pull for replies (then doubling up to deploy.poll_interval)


@dataclass(frozen=True)
class Roster:
    """A simulation's merchants as its launcher knows them: node id -> partition (filled by Flower's engine as
    it registers nodes, server/flower_patches.py), and each partition's name and training examples."""

    nodes: dict[int, int]
    names: list[str]
    sizes: list[int]
    wait: float = 10.0  # seconds a node may take to appear in `nodes` before it is asked instead


def _packed(msg: Message) -> Message:
    """The message to push: its content packed, its metadata shared (so the original learns its message id)."""
    return msg if msg.has_error() else _with_content(msg, wire.pack(msg.content))


def _unpacked(msg: Message) -> Message:
    """A reply with its arrays unpacked; one whose packing does not fit its layout comes back as it is (still
    packed), which the reply validation rejects and records (server/strategy.py: check_update)."""
    if msg.has_error():
        return msg
    try:
        content = wire.unpack(msg.content)
    except wire.WireError as err:
        log.warning("node %d sent arrays that do not unpack: %s", msg.metadata.src_node_id, err)
        return msg
    return _with_content(msg, content)


def _with_content(msg: Message, content: RecordDict) -> Message:
    """`msg` itself when its content is `content`, else a message with that content and msg's metadata."""
    return msg if content is msg.content else Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


class MerchantGrid(Grid):
    """Delegates to a Flower Grid; get_node_ids() is ordered by merchant index."""

    def __init__(self, inner: Grid, timeout: float, poll_interval: float, base_fingerprint: str,
                 audit: Path | None = None, roster: Roster | None = None) -> None:
        self.inner = inner
        self.roster = roster
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.audit = audit
        self.index: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.sizes: dict[int, int] = {}  # training examples per node, as the node reported them
        self.base_fingerprint = base_fingerprint  # asked of every node with its identity (common/tasks/exchange.py)
        self.refused: dict[int, str] = {}  # nodes that hold another frozen base: why
        # Called with (sent, replies, seconds) after every send_and_receive (SecAgg+ counts its stages so).
        self.tap: Callable[[list[Message], list[Message], float], None] | None = None

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Delegate."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate, each message's arrays packed for the trip (common/protocol/wire.py: pack); the messages given keep
        their content and get their ids."""
        return self.inner.push_messages([_packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate, unpacking each reply's arrays; with an audit file, append what each reply carried (structure
        and types, no values)."""
        replies = [_unpacked(m) for m in self.inner.pull_messages(message_ids)]
        if self.audit is not None and replies:
            with self.audit.open("a") as f:
                for msg in replies:
                    f.write(json.dumps(describe(msg)) + "\n")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull replies until all arrived or `timeout` passed: first after FIRST_POLL seconds, the wait
        doubling up to poll_interval.

        Flower's HTTP grid (deployment) sleeps a fixed 3 s between pulls, and a fixed interval costs a whole
        interval on every exchange whose replies come back at once (SecAgg+'s key stages: 0.2 s each at 0.2 s).
        """
        sent = list(messages)
        start = time.time()
        pending = set(self.push_messages(sent))
        end = start + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        wait = min(FIRST_POLL, self.poll_interval)
        while pending and time.time() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(wait)
                wait = min(2 * wait, self.poll_interval)
        if self.tap is not None:
            self.tap(sent, replies, time.time() - start)
        return replies

    def identify(self, node_ids: list[int]) -> None:
        """Ask nodes not seen before for their merchant index; nodes that do not answer stay unknown."""
        unknown = self._from_roster([n for n in node_ids if n not in self.index])
        if not unknown:
            return
        asks = [Message(content=wire.query_content(self.base_fingerprint), message_type=wire.QUERY, dst_node_id=n)
                for n in unknown]
        for reply in self.send_and_receive(asks, timeout=self.timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise wire.WireError(reply.error.reason)
                who = wire.QueryReply.from_content(reply.content)
            except wire.WireError as err:
                if wire.BASE_MISMATCH in str(err):
                    self.refused[node] = str(err)
                log.warning("node %d did not identify itself: %s", node, err)
                continue
            self.index[node], self.names[node], self.sizes[node] = (who.merchant_index, who.merchant_name,
                                                                    who.num_examples)

    def _from_roster(self, nodes: list[int]) -> list[int]:
        """Identify nodes the roster knows (the same run config built them: same base); the rest."""
        if self.roster is None or not nodes:
            return nodes
        deadline = time.time() + self.roster.wait
        while any(n not in self.roster.nodes for n in nodes) and time.time() < deadline:
            time.sleep(0.05)  # Flower's engine has created the nodes but not yet returned their mapping
        roster = self.roster
        for node in (n for n in nodes if n in roster.nodes):
            part = roster.nodes[node]
            self.index[node], self.names[node], self.sizes[node] = part, roster.names[part], roster.sizes[part]
        return [n for n in nodes if n not in self.index]

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids, in merchant order (unidentified nodes last, by id)."""
        ids = list(self.inner.get_node_ids())
        self.identify(ids)
        return sorted(ids, key=lambda n: (self.index.get(n, 1 << 62), n))


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's values: array data, config bytes/strings, 8 per number (no protocol framing)."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    records: list[dict[str, Any]] = [dict(r) for r in content.config_records.values()]
    records += [dict(r) for r in content.metric_records.values()]
    for record in records:
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes | str) else 8
    return total


def describe(msg: Message) -> dict[str, Any]:
    """What a merchant's reply carries, without its values: record names, array dtypes and shapes, scalar types.

    Strings are the one exception: they are reported with their value, so an audit shows any text that left
    a merchant. Lists (SecAgg+ keys, shares, masked vectors) are reported as element type, length and bytes.
    """
    out: dict[str, Any] = {"node": msg.metadata.src_node_id, "type": msg.metadata.message_type,
                           "time": time.time(), "error": msg.has_error()}
    if msg.has_error():
        return out
    content = msg.content
    out["arrays"] = {name: {k: {"dtype": a.dtype, "shape": list(a.shape), "bytes": len(a.data)}
                            for k, a in rec.items()} for name, rec in content.array_records.items()}
    out["metrics"] = {name: {k: type(v).__name__ for k, v in rec.items()}
                      for name, rec in content.metric_records.items()}
    out["configs"] = {name: {k: _shape_of(v) for k, v in rec.items()} for name, rec in content.config_records.items()}
    return out


def _shape_of(value: Any) -> Any:
    """A config value for the audit: strings (alone or in a list) as they are, other lists as element type,
    length and bytes, anything else as its type."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        size = sum(len(v) if isinstance(v, bytes | str) else 8 for v in value)
        return {"list": "|".join(kinds), "len": len(value), "bytes": size}
    return type(value).__name__
