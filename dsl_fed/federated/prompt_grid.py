"""A Grid that collects replies every 0.1 s instead of every 3 s (the ServerApp's `main` wraps Flower's in it).

Flower 1.42's deployment Grid (`HttpGrid.send_and_receive`, which `Strategy.start` uses for every training and
evaluation exchange) sleeps 3 s between pulls for replies: each exchange waits 1.5 s on average (up to 3 s) after
its last reply arrived, and a federated round has two. The simulation's Grid pulls every 0.1 s. `PromptGrid` does
what ``send_and_receive`` does - push, then pull until every message is answered or `timeout` passes - with the
public ``push_messages`` / ``pull_messages`` and a short interval; everything else is the wrapped Grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_SECONDS = 0.1  # the simulation's Grid pulls as often


class PromptGrid(Grid):
    """`grid`, pulling replies every `interval` seconds in `send_and_receive`."""

    def __init__(self, grid: Grid, interval: float = PULL_SECONDS) -> None:
        self.grid = grid
        self.interval = interval

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
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while end is None or time.monotonic() < end:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in got)
            if not waiting:
                break
            time.sleep(self.interval)
        return replies
