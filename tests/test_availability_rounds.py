"""``federated.availability`` in the strategy: only online clients are sampled, nodes tell their client id through the
real ClientApp's query handler (`InProcessGrid`), training replies are hand-made (no model is built)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flower_helpers import InProcessGrid, task_identity  # noqa: F401 (autouse fixture)
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from dsl_fed.availability import Trace
from dsl_fed.config import DpConfig
from dsl_fed.federated.protocol import QUERY_CLIENT_ID
from dsl_fed.federated.strategy import PhaseSchedule, RoundStats, SliceFedAvg

HEAD = ["head/kernel", "head/bias"]


def model() -> dict[str, np.ndarray]:
    return {"stem/kernel": np.full((2, 2), 7.0, np.float32), "head/kernel": np.zeros((2, 2), np.float32),
            "head/bias": np.zeros((2,), np.float32)}


class Fleet(InProcessGrid):
    """Nodes 100.. (partition ids 0..): queries go to the real ClientApp, training gets `update(partition)` back."""

    def __init__(self, num_nodes: int, sabotage=None, update=lambda partition: float(partition)) -> None:
        super().__init__({}, num_nodes, sabotage=sabotage)
        self.update = update
        self.rounds: list[list[int]] = []  # partition ids sent a training message, per exchange
        self.queried: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        queries = [m for m in messages if m.metadata.message_type == QUERY_CLIENT_ID]
        others = [m for m in messages if m.metadata.message_type != QUERY_CLIENT_ID]
        self.queried += [m.metadata.dst_node_id for m in queries]
        replies = super().send_and_receive(queries, timeout) if queries else []
        trained = []
        for msg in others:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            partition = msg.metadata.dst_node_id - 100
            if msg.metadata.message_type == MessageType.TRAIN:
                trained.append(partition)
                arrays = {n: Array(np.full(model()[n].shape, self.update(partition), np.float32)) for n in HEAD}
                content = RecordDict({"arrays": ArrayRecord(arrays),
                                      "metrics": MetricRecord({"num-examples": 1, "partition-id": partition})})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "devel-confusion": [1, 0, 0, 1]})})
            replies.append(Message(content, reply_to=msg))
        if any(m.metadata.message_type == MessageType.TRAIN for m in others):
            self.rounds.append(sorted(trained))
        return replies


def trace(rows: dict[int, list[tuple[int, int]]]) -> Trace:
    return Trace({c: tuple(v) for c, v in rows.items()})


def strategy(availability: Trace, **kwargs) -> SliceFedAvg:
    defaults = dict(model_arrays=model(), slice_names={1: HEAD}, schedule=PhaseSchedule(4, 0), min_train_nodes=2,
                    min_available_nodes=2, fraction_evaluate=0.0, availability=availability)
    return SliceFedAvg(**{**defaults, **kwargs})


def test_only_online_clients_train_and_each_round_records_online_sampled_and_contributed():
    # 8 clients; round r: clients online per the trace (client 7 has no row: never online)
    online = trace({0: [(1, 4)], 1: [(1, 1), (3, 4)], 2: [(2, 4)], 3: [(1, 2)], 4: [(4, 4)], 5: [(1, 4)], 6: [(2, 3)]})
    fleet = Fleet(8)
    s = strategy(online, fraction_train=0.5)
    result = s.start(grid=fleet, initial_arrays=s.full_record(), num_rounds=4)
    expected_online = {r: online.online_clients(r) for r in range(1, 5)}
    assert expected_online == {1: [0, 1, 3, 5], 2: [0, 2, 3, 5, 6], 3: [0, 1, 2, 5, 6], 4: [0, 1, 2, 4, 5]}
    for rnd, trained in enumerate(fleet.rounds, start=1):
        assert set(trained) <= set(expected_online[rnd]), rnd  # nobody offline is ever sent a training message
        stats = s.rounds[rnd]
        # Flower's rule on the online nodes: half of them rounded down, at least min_train_nodes
        assert (stats.online, stats.sampled, stats.aggregated) == (len(expected_online[rnd]),
                                                                     max(len(expected_online[rnd]) // 2, 2),
                                                                     len(trained)), rnd
        assert sorted(stats.contributors) == [100 + p for p in trained]
    assert sorted(fleet.queried) == list(range(100, 108))  # every node asked once, in round 1
    assert s.online_clients.client_of == {100 + i: i for i in range(8)}
    last = fleet.rounds[-1]
    np.testing.assert_allclose(result.arrays["head/bias"].numpy(), np.mean(last))  # the last round's online mean
    assert s.rounds[1].published(dp=False)["online"] == 4


def test_a_round_with_too_few_online_clients_keeps_the_model_and_the_run_goes_on(caplog):
    fleet = Fleet(4)
    s = strategy(trace({0: [(1, 1), (3, 3)], 1: [(1, 1), (3, 3)], 2: [(2, 2)], 3: [(3, 3)]}),
                 fraction_evaluate=1.0, min_evaluate_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        result = s.start(grid=fleet, initial_arrays=s.full_record(), num_rounds=3)
    assert fleet.rounds == [[0, 1], [0, 1, 3]]  # round 2 sent no training message at all
    assert (s.rounds[2].online, s.rounds[2].sampled, s.rounds[2].updated) == (1, 0, False)
    assert "round 2: 1 node(s) online, fewer than the 2 its train needs; nobody is sampled and the global model " \
           "stays as it was" in caplog.text
    assert "valid update(s)" not in caplog.text  # no second, misleading warning for the empty round
    evaluated = [m.metadata.dst_node_id - 100 for m in fleet.sent if m.metadata.message_type == MessageType.EVALUATE
                 and m.content["config"]["server-round"] == 2]
    assert evaluated == [2]  # federated evaluation samples the online node only
    assert s.rounds[3].updated and s.rounds[3].online == 3
    np.testing.assert_allclose(result.arrays["head/bias"].numpy(), (0 + 1 + 3) / 3)


def test_a_node_answering_the_query_with_garbage_is_offline_and_logged_and_the_server_goes_on(caplog):
    def sabotage(index, msg, reply):
        if msg.metadata.message_type != QUERY_CLIENT_ID:
            return reply
        content = {1: RecordDict({"identity": ConfigRecord({"client-id": "0; DROP"})}),
                   2: RecordDict({"identity": ConfigRecord({"client-id": 10**9})}),
                   3: RecordDict({"metrics": MetricRecord({"x": 1})}),
                   5: RecordDict({"identity": ConfigRecord({"client-id": 6})})}  # impersonates client 6
        if index == 4:
            return Message(Error(code=0, reason="ClientAppException occurred. Message: boom"), reply_to=msg)
        return Message(content[index], reply_to=msg) if index in content else reply

    fleet = Fleet(8, sabotage=sabotage)
    s = strategy(trace({c: [(1, 2)] for c in range(8)}), min_train_nodes=1, fraction_evaluate=1.0, min_evaluate_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        s.start(grid=fleet, initial_arrays=s.full_record(), num_rounds=2)
    assert fleet.rounds == [[0, 7], [0, 7]]  # 1-4 gave no usable id, 5 and 6 both claim client 6
    assert s.rounds[1].online == 2 and s.rounds[1].updated
    assert "node 101 is offline this round: its client id is unknown (client-id '0; DROP' is not a whole number in " \
           "[0, 1000000000))" in caplog.text
    assert "node 102 is offline this round: its client id is unknown (client-id '1000000000'" in caplog.text
    assert "node 103 is offline this round: its client id is unknown (no identity/client-id in its answer)" in caplog.text
    assert "node 104 is offline this round: its client id is unknown (it answered with an error: boom)" in caplog.text
    assert caplog.text.count("nodes 105, 106 all claim client id 6; none of them is sampled") == 2  # once a round
    assert fleet.queried == list(range(100, 108)) + [101, 102, 103, 104]  # the unknown ones asked again


def test_a_node_that_connects_later_is_asked_once_and_a_client_absent_from_the_trace_is_never_online(caplog):
    fleet = Fleet(4)
    late = fleet.contexts.pop(103)
    s = strategy(trace({0: [(1, 3)], 1: [(1, 3)], 3: [(1, 3)]}), min_train_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        s.configure_train(1, ArrayRecord(), ConfigRecord(), fleet)
        fleet.contexts[103] = late
        s.configure_train(2, ArrayRecord(), ConfigRecord(), fleet)
        s.configure_train(3, ArrayRecord(), ConfigRecord(), fleet)
    assert fleet.queried == [100, 101, 102, 103]
    assert [s.rounds[r].online for r in (1, 2, 3)] == [2, 3, 3]
    assert caplog.text.count("1 client(s) have no row in the availability trace and are never online: 2") == 1


def test_dp_noise_is_sized_for_the_online_clients_averaged():
    """Availability changes how many updates are averaged, not the accounting: the noise on the mean of the m
    online clients' clipped updates is z * C / m, one Gaussian(z) release per published round."""
    n = 200
    big = {"head/kernel": np.zeros((n, n), np.float32), "head/bias": np.zeros(n, np.float32)}
    s = SliceFedAvg(model_arrays=big, slice_names={1: list(big)}, schedule=PhaseSchedule(2, 0), min_train_nodes=2,
                    min_available_nodes=6, fraction_evaluate=0.0, num_nodes=6,
                    dp=DpConfig(mode="server", clip_norm=2.0, noise_multiplier=1.0),
                    availability=trace({0: [(1, 1)], 2: [(1, 1)], 4: [(1, 1)]}))
    fleet = Fleet(6)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), fleet))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [100, 102, 104]
    for m in msgs:
        m.metadata.__dict__["_message_id"] = f"t{m.metadata.dst_node_id}"
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v + 1e-6) for k, v in big.items()}),
                                   "metrics": MetricRecord({"num-examples": 1, "partition-id": i})}), reply_to=m)
               for i, m in enumerate(msgs)]
    full, _ = s.aggregate_train(1, replies)
    noise = np.concatenate([full[k].numpy().ravel() for k in big]) - 1e-6
    assert np.std(noise) == pytest.approx(2.0 / 3, rel=0.05) and s.dp_releases == 1
    assert list(s.configure_train(2, ArrayRecord(), ConfigRecord(), fleet)) == []  # nobody online in round 2
    assert s.aggregate_train(2, []) == (None, None) and s.dp_releases == 1  # no release, no epsilon spent


def test_round_line_and_history_report_online_only_with_a_trace():
    from dsl_fed.federated.server_app import _history_row, progress_line

    stats = RoundStats(round=3, phase=1, online=5, sampled=2, aggregated=2, updated=True)
    assert "| clients 2/2 of 5 online |" in progress_line(stats, {}, 4, 1.0)
    assert _history_row(stats, {}, 1.0, 0.1)["clients_online"] == 5
    plain = RoundStats(round=3, phase=1, sampled=2, aggregated=2, updated=True)
    assert "online" not in progress_line(plain, {}, 4, 1.0) and "clients_online" not in _history_row(plain, {}, 1.0, 0.1)


@pytest.mark.slow  # a federated run of the tiny model in-process: about 10-20 s on 2 cores
def test_the_server_app_reads_the_trace_and_reports_online_clients_per_round(demo_manifest, tmp_path, caplog):
    """`run_server` with real ClientApps: round 1 has clients 0 and 1 online, round 2 only client 2 (below
    min_train_nodes): round 2 keeps round 1's model, and history.csv, the manifests and the round line say so."""
    from flower_helpers import run_config, saved_weights, write_config

    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.server_app import run_server

    (tmp_path / "trace.csv").write_text("client,online_from,online_to\n0,1,1\n1,1,1\n2,2,2\n")
    config = write_config(tmp_path, demo_manifest, federated={"phase1_rounds": 2, "phase2_rounds": 0, "local_epochs": 1,
                                                              "availability": "trace.csv"})
    rc = run_config(config, server_eval=demo_manifest)
    grid = InProcessGrid(rc, 3)
    with caplog.at_level(logging.INFO, logger="flwr.dsl_fed"):
        run_server(grid, rc, node_timeout=5)
    run = RunDirectory(tmp_path / "runs" / "fed")
    rows = run.read_history()
    assert [(int(r["clients_online"]), int(r["clients_sampled"]), int(r["clients_aggregated"])) for r in rows] == \
           [(2, 2, 2), (1, 0, 0)]
    clients = [run.manifest(k)["extra"]["clients"] for k in (1, 2)]
    assert [(c["online"], c["sampled"], c["aggregated"], c["updated"]) for c in clients] == \
           [(2, 2, 2, True), (1, 0, 0, False)]
    assert sorted(clients[0]["contributors"]) == [100, 101]
    assert [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query.client_id"] == [100, 101, 102]
    assert "clients 2/2 of 2 online" in caplog.text and "clients 0/0 of 1 online - model unchanged" in caplog.text
    first, second = saved_weights(run.round_dir(1)), saved_weights(run.round_dir(2))
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value, err_msg=name)


def test_a_deployed_node_answers_with_its_persistent_id_and_a_broken_folder_with_an_error(tmp_path):
    from dsl_fed.data.nodes import persistent_node_id
    from dsl_fed.federated.protocol import NODE_FAILED

    good, bad = tmp_path / "site", tmp_path / "broken"
    good.mkdir()
    bad.mkdir()
    (bad / ".dsl_fed_node_id").write_text("not a number\n")
    grid = InProcessGrid({}, 2, node_configs=[{"data-path": str(good)}, {"data-path": str(bad)}])
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type=QUERY_CLIENT_ID)
                                     for node in (100, 101)])
    assert replies[0].content.config_records["identity"]["client-id"] == persistent_node_id(good)
    assert replies[1].has_error() and replies[1].error.code == NODE_FAILED
    assert "not a node id written by dsl_fed" in replies[1].error.reason
    s = strategy(trace({persistent_node_id(good): [(1, 1)]}), min_train_nodes=1)
    assert s.online_clients.online(grid, 1, [100, 101], timeout=60) == [100]
    assert s.online_clients.client_of == {100: persistent_node_id(good)}
