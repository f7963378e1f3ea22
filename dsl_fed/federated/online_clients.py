"""Which connected nodes are online in a round of the availability trace (``federated.availability``).

Flower's node ids are random; the trace names client ids (`node_identity.client_id`), so the server asks each
node its client id once (a `QUERY_CLIENT_ID` message) and keeps the map. Answers are untrusted input.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from dsl_fed.availability import MAX_CLIENT, Trace
from dsl_fed.federated.protocol import CLIENT_ID, IDENTITY, QUERY_CLIENT_ID
from dsl_fed.federated.replies import short_reason
from dsl_fed.federated.run_config import PROGRESS_MARK

LOG = logging.getLogger("flwr").getChild("dsl_fed")


class OnlineClients:
    """The client id of each node that answered, and the online ones among the connected nodes of a round."""

    def __init__(self, trace: Trace, config_key: str) -> None:
        self.trace = trace
        self.config_key = config_key  # where the query's ConfigRecord goes (the strategy's configrecord_key)
        self.client_of: dict[int, int] = {}  # node id -> client id it answered
        self._asked_in: dict[int, int] = {}  # node -> last round it was asked (at most once a round)
        self._reported_absent: set[int] = set()  # nodes already logged as absent from the trace
        self._reported_claims: set[tuple[int, int]] = set()  # (round, client id) claimed by several nodes, logged

    def online(self, grid: Grid, rnd: int, nodes: list[int], timeout: float) -> list[int]:
        """The connected `nodes` whose client is online in round `rnd`.

        A node not asked before is asked now (one that joins later when it first shows up). An answer that is
        not a whole number in the id range, an error or no answer leaves the node offline for the round (it is
        asked again the next round); an id two connected nodes claim leaves both offline - which one holds that
        client's data is unknown.
        """
        unknown = [node for node in nodes if node not in self.client_of and self._asked_in.get(node) != rnd]
        if unknown:
            self._ask(rnd, grid, unknown, timeout)
        claims: dict[int, list[int]] = {}
        for node in nodes:
            if node in self.client_of:
                claims.setdefault(self.client_of[node], []).append(node)
        online = []
        for client, holders in sorted(claims.items()):
            if len(holders) > 1:
                if (rnd, client) in self._reported_claims:  # said once per round (training and evaluation sample)
                    continue
                self._reported_claims.add((rnd, client))
                LOG.warning("%s round %d: nodes %s all claim client id %d; none of them is sampled", PROGRESS_MARK,
                            rnd, ", ".join(map(str, holders)), client)
            elif self.trace.online(client, rnd):
                online.append(holders[0])
        absent = sorted(c for c, holders in claims.items() if c not in self.trace.intervals
                        and not any(n in self._reported_absent for n in holders))
        if absent:
            self._reported_absent.update(n for c in absent for n in claims[c])
            LOG.warning("%s round %d: %d client(s) have no row in the availability trace and are never online: %s",
                        PROGRESS_MARK, rnd, len(absent),
                        ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else ""))
        return sorted(online)

    def _ask(self, rnd: int, grid: Grid, nodes: list[int], timeout: float) -> None:
        """Ask `nodes` their client ids; keep each valid answer in `client_of`, log the others."""
        self._asked_in.update(dict.fromkeys(nodes, rnd))
        queries = [Message(RecordDict({self.config_key: ConfigRecord({"server-round": rnd})}), dst_node_id=node,
                           message_type=QUERY_CLIENT_ID) for node in nodes]
        replies = list(grid.send_and_receive(queries, timeout=timeout))
        asked = {q.metadata.message_id: q.metadata.dst_node_id for q in queries}
        answered: dict[int, str | int] = {}
        for reply in replies:
            node = asked.get(reply.metadata.reply_to_message_id)
            if node is None or node in answered:
                continue
            answered[node] = client_id_answer(reply, MAX_CLIENT)
        for node in nodes:
            answer = answered.get(node, "no answer")
            if isinstance(answer, int):
                self.client_of[node] = answer
            else:
                LOG.warning("%s round %d: node %d is offline this round: its client id is unknown (%s)", PROGRESS_MARK,
                            rnd, node, answer)


def client_id_answer(reply: Message, limit: int) -> int | str:
    """The client id a `QUERY_CLIENT_ID` reply carries, or why it carries none (the reply is untrusted)."""
    if reply.has_error():
        return f"it answered with an error: {short_reason(reply.error.reason)}"
    try:
        value = reply.content.config_records[IDENTITY][CLIENT_ID]
    except Exception:  # noqa: BLE001 - anything unreadable is simply no id
        return f"no {IDENTITY}/{CLIENT_ID} in its answer"
    if type(value) is not int or not 0 <= value < limit:
        return f"{CLIENT_ID} {str(value)[:40]!r} is not a whole number in [0, {limit})"
    return value
