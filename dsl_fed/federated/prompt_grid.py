"""Pulling replies every 0.1 s instead of every 3 s (the ServerApp's `main` wraps Flower's Grid in `PromptGrid`).

Flower 1.42's deployment Grid (`HttpGrid.send_and_receive`, which Flower's `Strategy.start` uses for every
exchange) sleeps 3 s between pulls for replies: each exchange waits 1.5 s on average (up to 3 s) after its last
reply arrived. The simulation's Grid pulls every 0.1 s. `exchange` does what ``send_and_receive`` does through
the public ``push_messages`` / ``pull_messages`` with a short interval, and lets the caller work between the push
and the pulls (`SliceAggregation.start` publishes a round while the nodes work on the next);
`PromptGrid.send_and_receive` is `exchange`. Everything else is the wrapped Grid's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation engine's Grid (not exported)

PULL_SECONDS = 0.1  # the simulation's Grid pulls as often
CONTENT_POLL_SECONDS = (0.05, 0.2)  # first and longest wait for a reply's content (Flower's: 1 s and 10 s)


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None = None,
             meanwhile: Callable[[], None] | None = None, interval: float = PULL_SECONDS) -> list[Message]:
    """Flower's ``send_and_receive`` - push, then pull until every message is answered or `timeout` passes -
    pulling every `interval` s and running `meanwhile()` (if any) between the push and the first pull.

    Replies come in the order of their messages; a message the SuperLink refused, or a reply to a message not
    sent here, has no reply.
    """
    ids = [i for i in grid.push_messages(messages) if i] if messages else []  # None: not pushed
    end = None if timeout is None else time.monotonic() + timeout
    if meanwhile is not None:
        meanwhile()
    waiting, replies = set(ids), {}
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            if reply.metadata.reply_to_message_id in waiting:
                replies[reply.metadata.reply_to_message_id] = reply
                waiting.discard(reply.metadata.reply_to_message_id)
        if not waiting or (end is not None and time.monotonic() >= end):
            break
        time.sleep(interval)
    return [replies[i] for i in ids if i in replies]




class PromptGrid(Grid):
    """`grid`, pulling replies every `interval` seconds in `send_and_receive`."""

    def __init__(self, grid: Grid, interval: float = PULL_SECONDS) -> None:
        self.grid = grid
        self.interval = interval
        if self.in_order:
            _prompt_content_pulls()

    @property
    def in_order(self) -> bool:
        """Whether each node answers its messages one at a time, in the order they were created (so one exchange
        may send a node several): a SuperNode does (it pulls the next message only after replying); Flower's
        simulation engine does not (two of its workers may run two messages of one node at once, each on its own
        copy of the node's state)."""
        return not isinstance(self.grid, InMemoryGrid)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return exchange(self, list(messages), timeout, interval=self.interval)


def _prompt_content_pulls() -> None:
    """Make the deployment Grid ask for a reply's content every 0.05 s, at most every 0.2 s.

    A SuperNode hands the SuperLink a reply before its content, so the Grid's first try for the content mostly
    comes too early; Flower's pull then waits 1 s, doubling up to 10 s. Flower's 2 hours stay the limit.
    Module state of the ServerApp's process: done once.
    """
    from flwr.superlink.grid import http_grid  # noqa: PLC0415 - Flower's deployment Grid

    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = functools.partial(http_grid.pull_objects, initial_backoff=CONTENT_POLL_SECONDS[0],
                                                   backoff_cap=CONTENT_POLL_SECONDS[1], max_tries_per_object=None)


class ImmediateReplies:
    """``push_messages`` / ``pull_messages`` for an in-process Grid whose ``send_and_receive`` answers at once."""

    in_order = True  # one message after the other

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        replies = self.send_and_receive(messages)  # gives each message its id, as Flower's Grid does on a push
        self._replies = {**getattr(self, "_replies", {}), **{r.metadata.reply_to_message_id: r for r in replies}}
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = getattr(self, "_replies", {})
        return [replies.pop(i) for i in message_ids if i in replies]
