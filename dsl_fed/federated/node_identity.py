"""Who a node is across runs and rounds, and the seed of its training in a round (Keras and LiteRT clients alike)."""

from __future__ import annotations

from flwr.app import Context

from dsl_fed.data.nodes import persistent_node_id
from dsl_fed.errors import DslFedError


def client_id(context: Context) -> int:
    """The simulation's partition id; in a deployment a random id kept in the node's folder.

    Not Flower's node id: that changes when a node registers with another SuperLink, and seeds (and the order
    updates are summed in) must not, so that a resumed run reproduces an uninterrupted one. Not derived from the
    node's speaker ids either: the id travels with every update, and a hash of speaker ids would tell anyone
    holding a public corpus's speaker list whom the node holds.
    """
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    try:
        return persistent_node_id(str(context.node_config["data-path"]))
    except DslFedError as exc:
        raise DslFedError(f"node {context.node_id}: {exc}") from None


def client_seed(seed: int, server_round: int, partition: int) -> int:
    """Seed of one node's training in one round: differs per round and node, identical on a re-run."""
    return seed + 1000 * server_round + partition
