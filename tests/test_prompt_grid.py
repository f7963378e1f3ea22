"""PromptGrid: Flower's send_and_receive contract (all replies, or what came before the timeout), pulled often."""

from __future__ import annotations

import time
from types import SimpleNamespace

from dsl_fed.federated.prompt_grid import PromptGrid


class SlowRepliesGrid:
    """Answers message i on its `ready[i]`-th pull; records the pulls."""

    def __init__(self, ready: dict[str, int]) -> None:
        self.ready, self.pulls = ready, 0

    def push_messages(self, messages):
        return [m.id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [i for i in message_ids if self.ready.get(i) == self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in due]


def test_collects_every_reply_pulling_every_interval():
    inner = SlowRepliesGrid({"a": 2, "b": 4})
    started = time.monotonic()
    replies = PromptGrid(inner, interval=0.05).send_and_receive([SimpleNamespace(id="a"), SimpleNamespace(id="b")])
    elapsed = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert inner.pulls == 4  # stops as soon as both are answered
    assert elapsed < 1.0  # Flower's HttpGrid: 3 s per pull, 9 s here


def test_returns_what_arrived_when_the_timeout_passes():
    inner = SlowRepliesGrid({"a": 1})
    started = time.monotonic()
    replies = PromptGrid(inner, interval=0.05).send_and_receive([SimpleNamespace(id="a"), SimpleNamespace(id="b")],
                                                               timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 1.0
