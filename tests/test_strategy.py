"""Partial aggregation by weight name: exact numbers on hand-made arrays, with a fake Grid (no Flower runtime)."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from dsl_fed.config import FederatedConfig
from dsl_fed.config import DpConfig
from dsl_fed.errors import DslFedError
from dsl_fed.federated.prompt_grid import ImmediateReplies
from dsl_fed.federated.strategy import (
    STRATEGIES,
    PhaseSchedule,
    SliceFedAdam,
    SliceFedAvg,
    SliceFedAvgM,
    SliceFedYogi,
    aggregate_client_metrics,
    make_strategy,
)

HEAD = ["head/kernel", "head/bias"]
TOP = ["top/kernel"]


def model() -> dict[str, np.ndarray]:
    return {
        "stem/kernel": np.full((2, 2), 7.0, np.float32),  # never trained: must never change or travel after round 1
        "top/kernel": np.zeros((3,), np.float32),
        "head/kernel": np.zeros((2, 2), np.float32),
        "head/bias": np.zeros((2,), np.float32),
    }


class FakeGrid(ImmediateReplies):
    """The part of `flwr.serverapp.Grid` that strategies use, answering with `client(node, message)`."""

    def __init__(self, nodes=(11, 12, 13), client=None):
        self.nodes = list(nodes)
        self.client = client

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            stamp(m)
            replies.append(self.client(m.metadata.dst_node_id, m))
        return replies


def stamp(msg: Message) -> Message:
    """Give a message the id Flower's Grid gives it when it is sent (replies name it in reply_to_message_id)."""
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def reply(msg: Message, arrays: dict[str, np.ndarray], num_examples: int, partition: int = 0, **metrics) -> Message:
    """A node's training reply; arrays not already float16/float32 travel as float32, as a node sends them."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(_wire(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "partition-id": partition, **metrics}),
    })
    return Message(content, reply_to=msg)


def _wire(values) -> np.ndarray:
    array = np.asarray(values)
    return array if array.dtype in (np.float16, np.float32) else array.astype(np.float32)


def failure(msg: Message, reason: str = "ClientAppException: boom") -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def strategy(cls=SliceFedAvg, **kwargs) -> SliceFedAvg:
    defaults = dict(model_arrays=model(), slice_names={1: HEAD, 2: HEAD + TOP}, schedule=PhaseSchedule(2, 1),
                    min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    return cls(**{**defaults, **kwargs})


def sent_names(msg: Message) -> set[str]:
    return set(msg.content["arrays"].keys())


def test_aggregation_is_the_example_weighted_mean_per_name_and_merges_into_the_full_model():
    s = strategy()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid())}
    replies = [
        reply(msgs[11], {"head/kernel": [[1, 2], [3, 4]], "head/bias": [1, -1]}, 1, partition=0),
        reply(msgs[12], {"head/kernel": [[5, 6], [7, 8]], "head/bias": [3, 3]}, 3, partition=1),
        reply(msgs[13], {"head/kernel": [[0, 0], [0, 0]], "head/bias": [-4, 4]}, 4, partition=2),
    ]
    full, metrics = s.aggregate_train(1, replies)
    # (1*1 + 3*5 + 4*0) / 8 = 2.0, ... ; bias (1*1 + 3*3 - 4*4) / 8 = -0.75, (-1 + 9 + 16) / 8 = 3.0
    np.testing.assert_array_equal(full["head/kernel"].numpy(), [[2.0, 2.5], [3.0, 3.5]])
    np.testing.assert_array_equal(full["head/bias"].numpy(), [-0.75, 3.0])
    np.testing.assert_array_equal(full["stem/kernel"].numpy(), np.full((2, 2), 7.0))  # merged, not shrunk
    np.testing.assert_array_equal(full["top/kernel"].numpy(), [0, 0, 0])
    assert set(full.keys()) == set(model())
    assert metrics["num-examples"] == 8 and "partition-id" not in metrics
    assert s.rounds[1].aggregated == 3 and s.rounds[1].num_examples == 8 and s.rounds[1].updated


def test_full_model_goes_to_a_node_once_then_only_the_phase_slice():
    s = strategy()
    grid = FakeGrid()
    first = s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert all(sent_names(m) == set(model()) for m in first)
    ok = {11: 1, 12: 1}
    s.aggregate_train(1, [reply(m, {n: np.ones_like(model()[n]) for n in HEAD}, 2) if m.metadata.dst_node_id in ok
                          else failure(m) for m in first])
    second = {m.metadata.dst_node_id: m for m in s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)}
    assert sent_names(second[11]) == sent_names(second[12]) == set(HEAD)
    assert sent_names(second[13]) == set(model())  # its round-1 reply was an error: it may hold nothing
    third = s.configure_train(3, ArrayRecord(), ConfigRecord(), grid)  # phase 2
    assert all(sent_names(m) == set(HEAD + TOP) for m in third)
    assert all(m.content["config"]["phase"] == 2 and m.content["config"]["server-round"] == 3 for m in third)
    head_bytes = 4 * (4 + 2)
    assert s.rounds[2].bytes_down == 2 * (ArrayRecord({n: Array(model()[n]) for n in HEAD}).count_bytes()) + \
        ArrayRecord({n: Array(a) for n, a in model().items()}).count_bytes()
    assert s.rounds[2].bytes_down > 2 * head_bytes  # payload plus the .npy headers


def test_nan_update_is_excluded_and_logged(caplog):
    s = strategy()
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    good = {"head/kernel": np.ones((2, 2)), "head/bias": np.ones(2)}
    bad = {"head/kernel": np.array([[np.nan, 0], [0, 0]]), "head/bias": np.ones(2)}
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        full, _ = s.aggregate_train(1, [reply(msgs[0], good, 1, 0), reply(msgs[1], good, 1, 1), reply(msgs[2], bad, 100, 2)])
    np.testing.assert_array_equal(full["head/kernel"].numpy(), np.ones((2, 2)))  # the 100-example NaN update is gone
    assert s.rounds[1].aggregated == 2 and len(s.rounds[1].rejected) == 1
    assert "non-finite values in head/kernel" in caplog.text and "partition 2" in caplog.text


def test_wrong_names_or_shapes_are_rejected():
    s = strategy()
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    good = {"head/kernel": np.ones((2, 2)), "head/bias": np.ones(2)}
    s.aggregate_train(1, [
        reply(msgs[0], good, 1),
        reply(msgs[1], {**good, "stem/kernel": np.zeros((2, 2))}, 1),  # sends a frozen weight
        reply(msgs[2], {"head/kernel": np.ones((3, 2)), "head/bias": np.ones(2)}, 1),  # wrong shape
    ])
    assert s.rounds[1].aggregated == 0 and not s.rounds[1].updated  # 1 valid < min_train_nodes=2
    assert any("unexpected ['stem/kernel']" in r for r in s.rounds[1].rejected)
    assert any("shape (3, 2)" in r for r in s.rounds[1].rejected)


def test_failed_clients_are_tolerated_down_to_min_train_nodes(caplog):
    s = strategy()
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    upd = {"head/kernel": np.full((2, 2), 2.0), "head/bias": np.ones(2)}
    full, _ = s.aggregate_train(1, [failure(msgs[0]), reply(msgs[1], upd, 5), reply(msgs[2], upd, 5)])
    assert full is not None and s.rounds[1].aggregated == 2 and len(s.rounds[1].failed) == 1
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid()))
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        full, metrics = s.aggregate_train(2, [failure(msgs[0]), failure(msgs[1]), reply(msgs[2], upd, 5)])
    assert full is None and metrics is None and not s.rounds[2].updated
    assert "fewer than min_train_nodes=2" in caplog.text and "boom" in caplog.text
    np.testing.assert_array_equal(s.model_arrays["head/kernel"], np.full((2, 2), 2.0))  # round 1's result kept


def test_float16_transfer_halves_the_bytes_and_aggregates_in_float32():
    big = {"head/kernel": np.zeros((64, 64), np.float32), "head/bias": np.zeros((64,), np.float32)}
    sizes = {}
    for dtype in ("float32", "float16"):
        s = SliceFedAvg(model_arrays=big, slice_names={1: list(big)}, schedule=PhaseSchedule(2, 0), min_train_nodes=1,
                        min_available_nodes=1, fraction_evaluate=0.0, transfer_dtype=dtype)
        grid = FakeGrid([5])
        [m] = s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
        s.aggregate_train(1, [reply(m, {k: v + 1 for k, v in big.items()}, 1)])
        [m] = s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
        assert m.content["arrays"]["head/kernel"].numpy().dtype == np.dtype(dtype)
        assert m.content["config"]["transfer-dtype"] == dtype
        upd = {k: (v + 1 / 3).astype(dtype) for k, v in big.items()}
        s.aggregate_train(2, [reply(m, upd, 1)])
        assert s.model_arrays["head/kernel"].dtype == np.float32
        sizes[dtype] = s.rounds[2].bytes_down
    assert 0.5 <= sizes["float16"] / sizes["float32"] < 0.52


def test_phase_schedule_and_round_offset():
    sched = PhaseSchedule(2, 1)
    assert [sched.phase(r) for r in (1, 2, 3)] == [1, 1, 2] and sched.num_rounds == 3
    with pytest.raises(ValueError):
        sched.phase(4)
    s = strategy(round_offset=2)  # resumed after round 2: Flower's round 1 is round 3 = phase 2
    [m, *_] = s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid())
    assert m.content["config"]["server-round"] == 3 and m.content["config"]["phase"] == 2
    assert 3 in s.rounds


def test_phase1_slice_must_be_inside_phase2_slice():
    with pytest.raises(ValueError, match="contained"):
        strategy(slice_names={1: HEAD, 2: TOP})


@pytest.mark.parametrize("cls", [SliceFedAdam, SliceFedYogi])
def test_adaptive_strategies_survive_the_phase_change_and_checkpoint_their_moments(cls):
    s = strategy(cls, eta=0.1)
    grid = FakeGrid()
    for rnd in (1, 2, 3):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        names = s.slice_names[s.schedule.phase(rnd)]
        full, _ = s.aggregate_train(rnd, [reply(m, {n: np.ones_like(model()[n]) for n in names}, 1, i)
                                          for i, m in enumerate(msgs)])
        assert full is not None
    assert set(s.m_t) == set(HEAD + TOP)
    assert np.all(s.model_arrays["top/kernel"] > 0)  # moved towards the clients' ones
    np.testing.assert_array_equal(s.model_arrays["stem/kernel"], np.full((2, 2), 7.0))
    state = s.state_arrays()
    assert set(state) == {f"{a}/{n}" for a in ("m_t", "v_t", "steps") for n in HEAD + TOP}
    assert int(state["steps/head/bias"]) == 3 and int(state["steps/top/kernel"]) == 1
    fresh = strategy(cls, eta=0.1)
    fresh.load_state_arrays(state)
    np.testing.assert_array_equal(fresh.v_t["top/kernel"], s.v_t["top/kernel"])


def test_make_strategy_maps_the_config():
    fed = FederatedConfig(strategy="fedprox", proximal_mu=0.5, min_train_nodes=2, min_available_nodes=3)
    s = make_strategy(fed, model(), {1: HEAD, 2: HEAD + TOP}, num_nodes=3)
    [m, *_] = s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid())
    assert m.content["config"]["proximal-mu"] == 0.5 and s.min_available_nodes == 3
    adam = make_strategy(FederatedConfig(strategy="fedadam", server_learning_rate=0.02, server_beta_2=0.999,
                                         server_tau=1e-7), model(), {1: HEAD, 2: HEAD}, num_nodes=3)
    assert isinstance(adam, SliceFedAdam) and (adam.eta, adam.beta_2, adam.tau) == (0.02, 0.999, 1e-7)


def test_client_metrics_are_weighted_means_with_summed_seconds():
    recs = [RecordDict({"m": MetricRecord({"num-examples": 1, "train-loss": 1.0, "train-seconds": 2.0, "partition-id": 0})}),
            RecordDict({"m": MetricRecord({"num-examples": 3, "train-loss": 5.0, "train-seconds": 4.0, "partition-id": 1})})]
    out = aggregate_client_metrics(recs, "num-examples")
    assert dict(out) == {"num-examples": 4, "train-loss": 4.0, "train-seconds": 6.0}


def test_start_completes_with_a_failing_and_a_nan_client():
    """Flower's own round loop runs through: errors and NaN updates never stop the run."""

    def client(node, msg):
        if node == 11:
            return failure(msg, "ClientAppException: training crashed")
        names = list(msg.content["arrays"].keys())
        names = [n for n in names if n in HEAD]
        value = np.nan if node == 12 else 1.0
        return reply(msg, {n: np.full(model()[n].shape, value) for n in names}, 1, node)

    s = strategy(min_train_nodes=1)
    result = s.start(grid=FakeGrid(client=client), initial_arrays=s.full_record(), num_rounds=2)
    assert set(result.arrays.keys()) == set(model())
    np.testing.assert_array_equal(result.arrays["head/bias"].numpy(), [1.0, 1.0])
    assert [len(s.rounds[r].failed) for r in (1, 2)] == [1, 1]
    assert [len(s.rounds[r].rejected) for r in (1, 2)] == [1, 1]


def test_a_node_that_lost_its_model_gets_it_within_the_round_and_trains_and_evaluates_in_it():
    """A restarted SuperNode keeps its node id but not its state: it asks, and the round re-sends it the model."""
    from dsl_fed.federated.protocol import NEEDS_FULL_MODEL

    holds: set[int] = set()  # nodes whose state holds the model
    restart = {(2, "train"): 12, (2, "evaluate"): 13}  # (round, kind) -> node restarted just before it

    def client(node, msg):
        config = msg.content["config"]
        holds.discard(restart.pop((config["server-round"], msg.metadata.message_type), None))
        if config["full-model"]:
            holds.add(node)
        elif node not in holds:
            return Message(Error(code=NEEDS_FULL_MODEL, reason=f"node {node} holds no model"), reply_to=msg)
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": node, "devel-confusion": [node, 0, 0, 0]})}),
                           reply_to=msg)
        return reply(msg, {n: np.full(model()[n].shape, float(node)) for n in HEAD}, 1, node)

    grid = FakeGrid(client=client)
    grid.sent = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: (grid.sent.extend(messages), send(messages, timeout))[1]
    s = strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    result = s.start(grid=grid, initial_arrays=s.full_record(), num_rounds=2, timeout=7)
    stats = s.rounds[2]
    assert stats.failed == [] and stats.aggregated == 3 and sorted(stats.contributors) == [11, 12, 13]
    np.testing.assert_array_equal(result.arrays["head/bias"].numpy(), [12.0, 12.0])  # mean of 11, 12, 13
    # all three evaluated: Flower's example-weighted mean of the counts' first cell, (11² + 12² + 13²) / 36
    assert result.evaluate_metrics_clientapp[2]["devel-confusion"][0] == pytest.approx(434 / 36)
    again = [m for m in grid.sent if m.content["config"]["server-round"] == 2 and m.content["config"]["full-model"]]
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in again] == [(12, "train"), (13, "evaluate")]
    assert sent_names(again[0]) == set(model()) and again[0].content["config"]["phase"] == 1
    full, head = (ArrayRecord({n: Array(model()[n]) for n in names}).count_bytes() for names in (model(), HEAD))
    assert stats.bytes_down == 3 * head + full + 3 * head + full  # train (3 slices + 1 model), then evaluate
    assert s._timeout == 7  # the re-sent messages wait as long as the round's


def test_a_rounds_evaluation_rides_in_the_next_rounds_training_message_and_is_published_while_the_nodes_work():
    """In a deployment (a Grid whose nodes answer in order) a node gets one message per round: training round
    r + 1 asks it to score the model first (that is round r's evaluation); a node sampled only for evaluation
    gets its evaluation message in the same exchange. Round r is published once the next exchange is out, with
    round r's model and server state."""
    from dsl_fed.federated.protocol import EVALUATE_FIRST, EVALUATION

    scored = MetricRecord({"num-examples": 2, "devel-confusion": [1, 0, 0, 1]})

    def client(node, msg):
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({"metrics": scored}), reply_to=msg)
        config = msg.content["config"]
        names = HEAD if config["phase"] == 1 else HEAD + TOP
        answer = reply(msg, {n: np.full(model()[n].shape, float(config["server-round"])) for n in names}, 1, node)
        if config.get(EVALUATE_FIRST) and node != 12:  # node 12 sends no evaluation: its update still counts
            answer.content[EVALUATION] = scored
        return answer

    grid = FakeGrid(nodes=(11, 12, 13, 14), client=client)
    events = []
    push = grid.push_messages

    def kind(m):
        config = m.content["config"]
        return f"{m.metadata.message_type} {config['server-round']}{' + evaluate' if config.get(EVALUATE_FIRST) else ''}"

    grid.push_messages = lambda messages: (events.append(sorted(kind(m) for m in messages)), push(messages))[1]
    s = strategy(cls=SliceFedAdam, fraction_train=0.75, min_train_nodes=3, fraction_evaluate=1.0, min_evaluate_nodes=1)
    states, after = {}, {}  # round -> its published state, the global model right after its aggregation
    aggregate = s.aggregate_train

    def aggregate_train(rnd, replies):
        arrays, metrics = aggregate(rnd, replies)
        after[rnd] = arrays["head/bias"].numpy().tolist()
        return arrays, metrics

    s.aggregate_train = aggregate_train

    def evaluate_fn(rnd, arrays):
        if rnd > 0:  # 0: the initial model
            events.append(f"publish {rnd}: {arrays['head/bias'].numpy().tolist()}, {len(s.rounds[rnd].evaluated)}")
            states[rnd] = s.state_after[rnd]

    s.start(grid=grid, initial_arrays=s.full_record(), num_rounds=3, evaluate_fn=evaluate_fn)
    sampled = {r: set(s.rounds[r].nodes) for r in (1, 2, 3)}
    assert all(len(nodes) == 3 for nodes in sampled.values())
    three = lambda what: [what] * 3  # noqa: E731
    assert events == [three("train 1"),
                      sorted(["evaluate 1"] + three("train 2 + evaluate")),  # one message per node
                      sorted(["evaluate 2"] + three("train 3 + evaluate")),
                      f"publish 1: {after[1]}, {4 - (12 in sampled[2])}",
                      ["evaluate 3"] * 4,  # the last round's evaluation goes out alone
                      f"publish 2: {after[2]}, {4 - (12 in sampled[3])}",
                      f"publish 3: {after[3]}, 4"]
    assert len({tuple(values) for values in after.values()}) == 3
    assert [int(states[r]["steps/head/bias"]) for r in (1, 2, 3)] == [1, 2, 3]  # FedAdam's state after that round
    assert s.state_after == {}
    assert [s.rounds[r].aggregated for r in (1, 2, 3)] == [3, 3, 3]
    slice_bytes = ArrayRecord({n: Array(model()[n]) for n in HEAD}).count_bytes()  # round 2: phase 1
    assert s.rounds[2].bytes_down == 4 * slice_bytes  # 3 training messages (they also evaluate) + 1 evaluation


def test_a_round_waits_for_min_available_nodes_only_for_node_wait_seconds(caplog):
    class Growing(FakeGrid):  # a second node connects while the round waits
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [11] if self.calls < 3 else [11, 12]

    s = strategy(min_train_nodes=1, node_wait=30.0)
    assert sorted(m.metadata.dst_node_id for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), Growing())) == [11, 12]
    s = strategy(min_train_nodes=1, node_wait=0.2)  # min_available_nodes=2, one node left
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        assert len(list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([11])))) == 1
    assert "1 node(s) connected after waiting 0 s for min_available_nodes=2; going on with them" in caplog.text
    assert s.min_available_nodes == 1  # the next round does not wait again
    with pytest.raises(DslFedError, match=r"^round 1: only 1 node\(s\) connected after waiting 0 s, but its train "
                                          r"needs at least 2$"):
        list(strategy(node_wait=0.2).configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([11])))


def run_round(s, rnd, updates, grid=None):
    """Configure round `rnd`, answer node i with updates[i] (weight name -> values), aggregate."""
    grid = grid or FakeGrid(range(11, 11 + len(updates)))
    msgs = sorted(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id)
    return s.aggregate_train(rnd, [reply(m, {n: np.asarray(v, np.float32) for n, v in u.items()}, 1, i)
                                   for i, (m, u) in enumerate(zip(msgs, updates, strict=True))])


def test_fedadam_step_equals_the_formula_and_phase2_weights_start_at_their_own_first_step():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = strategy(SliceFedAdam, schedule=PhaseSchedule(1, 1), eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    ones = {n: np.ones_like(model()[n]) for n in HEAD + TOP}
    run_round(s, 1, [{n: ones[n] for n in HEAD}] * 3)
    # t = 1: m = 0.1, v = 0.01, step = eta * sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + tau)
    first = eta * np.sqrt(1 - b2) / (1 - b1) * 0.1 / (0.1 + tau)
    np.testing.assert_allclose(s.model_arrays["head/bias"], [first, first], rtol=1e-6)
    run_round(s, 2, [ones] * 3)  # phase 2: top/kernel joins
    np.testing.assert_allclose(s.model_arrays["top/kernel"], np.full(3, first), rtol=1e-6)  # its own t = 1
    d = 1.0 - first
    m, v = b1 * 0.1 + (1 - b1) * d, b2 * 0.01 + (1 - b2) * d**2
    second = first + eta * np.sqrt(1 - b2**2) / (1 - b1**2) * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(s.model_arrays["head/bias"], [second, second], rtol=1e-6)


def test_fedyogi_step_equals_the_formula():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = strategy(SliceFedYogi, eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    run_round(s, 1, [{"head/kernel": np.full((2, 2), 2.0), "head/bias": [2.0, 2.0]}] * 3)
    v = 0 - (1 - b2) * 4.0 * np.sign(0 - 4.0)  # Yogi: v - (1 - b2) d^2 sign(v - d^2), d = 2
    np.testing.assert_allclose(s.model_arrays["head/bias"], np.full(2, eta * (1 - b1) * 2.0 / (np.sqrt(v) + tau)),
                               rtol=1e-6)


def test_sampling_has_its_own_seeded_generator_and_leaves_the_global_random_alone():
    import random

    grid = FakeGrid(range(1, 10))
    state = random.getstate()
    picks = [tuple(sorted(m.metadata.dst_node_id for m in strategy(fraction_train=0.34, seed=seed).configure_train(
        1, ArrayRecord(), ConfigRecord(), grid))) for seed in (5, 5, 0, 1, 2, 3)]
    assert random.getstate() == state
    assert len(picks[0]) == 3 and picks[0] == picks[1] and len(set(picks)) > 2


# Robust strategies on hand-made 2-d updates: four honest clients and one outlier (equal example counts).
HONEST = [(1.0, 1.0), (2.0, 2.0), (2.5, 2.5), (4.0, 4.0)]
OUTLIER = (100.0, -100.0)


@pytest.mark.parametrize("name, kwargs, expected", [
    ("fedavg", {}, ((1 + 2 + 2.5 + 4 + 100) / 5, (1 + 2 + 2.5 + 4 - 100) / 5)),
    ("fedmedian", {}, (2.5, 2.0)),
    ("fedtrimmedavg", {"trim_fraction": 0.2}, ((2 + 2.5 + 4) / 3, (1 + 2 + 2.5) / 3)),
    # Krum scores (sum of squared distances to the 5 - 1 - 2 = 2 nearest): 6.5, 2.5, 5.0, 12.5, huge -> (2, 2)
    ("krum", {"num_malicious": 1}, (2.0, 2.0)),
    ("multikrum", {"num_malicious": 1}, ((1 + 2 + 2.5 + 4) / 4, (1 + 2 + 2.5 + 4) / 4)),  # the best n - f = 4
])
def test_robust_strategies_give_the_expected_aggregate_with_one_outlier(name, kwargs, expected):
    fed = FederatedConfig(strategy=name, min_train_nodes=5, min_available_nodes=5, fraction_evaluate=0.0, **kwargs)
    s = make_strategy(fed, {"head/bias": np.zeros(2, np.float32), "stem/kernel": np.full(2, 7.0, np.float32)},
                      {1: ["head/bias"], 2: ["head/bias"]}, num_nodes=5)
    full, _ = run_round(s, 1, [{"head/bias": u} for u in [*HONEST, OUTLIER]])
    np.testing.assert_allclose(full["head/bias"].numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(full["stem/kernel"].numpy(), [7.0, 7.0])


def test_bulyan_ignores_the_outlier_and_fedavgm_applies_momentum():
    fed = FederatedConfig(strategy="bulyan", num_malicious=1, min_train_nodes=7, min_available_nodes=7)
    s = make_strategy(fed, {"head/bias": np.zeros(2, np.float32)}, {1: ["head/bias"], 2: ["head/bias"]}, num_nodes=7)
    full, _ = run_round(s, 1, [{"head/bias": u} for u in [(3, 3)] * 5 + [(3.5, 3.5), OUTLIER]])
    np.testing.assert_allclose(full["head/bias"].numpy(), [3.0, 3.0])  # median 3; the 3 closest to it are 3
    m = make_strategy(FederatedConfig(strategy="fedavgm", server_momentum=0.5), {"head/bias": np.zeros(2, np.float32)},
                      {1: ["head/bias"], 2: ["head/bias"]}, num_nodes=3)
    run_round(m, 1, [{"head/bias": (1.0, 1.0)}] * 3)  # pseudo-gradient -1, momentum -1: w = 1
    full, _ = run_round(m, 2, [{"head/bias": (2.0, 2.0)}] * 3)  # pseudo-gradient -1, momentum 0.5 * -1 - 1: w = 2.5
    np.testing.assert_allclose(full["head/bias"].numpy(), [2.5, 2.5])


def test_krum_ranks_tiny_updates_on_a_large_slice_correctly():
    """Updates of 1e-5 per weight on a 525 000-weight slice: ranking absolute float32 weights by
    ||x||² + ||y||² - 2x·y (Flower's formula) errs by ~1e-3, more than the distances (~1e-4), and picks another
    client; ranking the float64 updates picks the one exact Krum picks."""
    from flwr.serverapp.strategy.multikrum import select_multikrum

    d, n = 525_000, 5
    rng = np.random.default_rng(0)
    start = rng.normal(0, 0.05, d).astype(np.float32)
    replies = [(start + rng.normal(0, 1e-5, d)).astype(np.float32) for _ in range(n)]
    x = np.stack([r.astype(np.float64) - start for r in replies])
    exact = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(row, i))[:n - 1 - 2].sum() for i, row in enumerate(exact)]
    right = int(np.argmin(scores))
    contents = [RecordDict({"a": ArrayRecord({"w": Array(r)})}) for r in replies]
    flower_pick = contents.index(select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=1)[0])
    assert flower_pick != right  # the float32 ranking on absolute weights really fails here
    fed = FederatedConfig(strategy="krum", num_malicious=1, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)
    s = make_strategy(fed, {"head/kernel": start}, {1: ["head/kernel"], 2: ["head/kernel"]}, num_nodes=n)
    full, _ = run_round(s, 1, [{"head/kernel": r} for r in replies])
    np.testing.assert_array_equal(full["head/kernel"].numpy(), replies[right])


def test_multikrum_mean_is_unweighted_so_an_inflated_example_count_buys_nothing():
    """Honest updates 1, 2, 2.5, 4.5 and an attacker at 3 claiming 1e9 examples: Krum scores (2 nearest) 3.25,
    1.25, 0.5, 6.25 and 1.25 select 1, 2, 2.5 and 3; their plain mean is 2.125 (weighted it would be ~3)."""
    fed = FederatedConfig(strategy="multikrum", num_malicious=1, min_train_nodes=5, min_available_nodes=5,
                          fraction_evaluate=0.0)
    s = make_strategy(fed, {"head/bias": np.zeros(1, np.float32)}, {1: ["head/bias"], 2: ["head/bias"]}, num_nodes=5)
    msgs = sorted(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(range(11, 16))),
                  key=lambda m: m.metadata.dst_node_id)
    values, examples = [1.0, 2.0, 2.5, 4.5, 3.0], [10, 10, 10, 10, 10**9]
    full, _ = s.aggregate_train(1, [reply(m, {"head/bias": np.array([v], np.float32)}, k, i)
                                    for i, (m, v, k) in enumerate(zip(msgs, values, examples))])
    np.testing.assert_allclose(full["head/bias"].numpy(), [2.125], rtol=1e-6)


@pytest.mark.parametrize("fraction, nodes, need", [(0.2, 4, 5), (0.2, 3, 5), (0.3, 3, 4), (0.0, 9, None)])
def test_fedtrimmedavg_that_would_trim_nothing_is_a_config_error(fraction, nodes, need):
    fed = FederatedConfig(strategy="fedtrimmedavg", trim_fraction=fraction, min_train_nodes=2, min_available_nodes=2)
    with pytest.raises(DslFedError, match=f"at least {need} clients per round" if need else "use federated.strategy fedavg"):
        make_strategy(fed, model(), {1: HEAD, 2: HEAD}, num_nodes=nodes)
    if need:
        make_strategy(fed, model(), {1: HEAD, 2: HEAD}, num_nodes=need)  # enough: one client cut at each end


def test_robust_strategies_need_enough_clients_for_num_malicious():
    with pytest.raises(DslFedError, match=r"federated.num_malicious: bulyan .* at least 7 clients"):
        make_strategy(FederatedConfig(strategy="bulyan", num_malicious=1), model(), {1: HEAD, 2: HEAD}, num_nodes=6)
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg",
                               "krum", "multikrum", "bulyan"}


def dp_strategy(mode="server", noise=0.0, clip=1.0, cls=SliceFedAvg, clipping="fixed", **kwargs):
    dp = DpConfig(mode=mode, clipping=clipping, clip_norm=clip, noise_multiplier=noise)
    return strategy(cls, dp=dp, num_nodes=3, **kwargs)


def test_server_side_clipping_bounds_each_update_of_the_whole_phase2_slice():
    s = dp_strategy("server", noise=0.0, clip=1.0, schedule=PhaseSchedule(1, 1))
    run_round(s, 1, [{n: np.full_like(model()[n], 1e-3) for n in HEAD}] * 3)
    s.model_arrays.update({n: np.zeros_like(model()[n]) for n in HEAD})
    # phase 2: every client's update has norm 10 over head + top (mostly in the unfrozen top layer)
    big = {"head/kernel": np.zeros((2, 2)), "head/bias": [0.0, 6.0], "top/kernel": [8.0, 0.0, 0.0]}
    full, _ = run_round(s, 2, [big] * 3)
    update = np.concatenate([full[n].numpy().ravel() - 0.0 for n in HEAD + TOP])
    assert np.linalg.norm(update) == pytest.approx(1.0, rel=1e-6)  # clipped to clip_norm as one vector
    np.testing.assert_allclose(full["top/kernel"].numpy(), [0.8, 0, 0], rtol=1e-6)  # the top layer is in it
    np.testing.assert_array_equal(full["stem/kernel"].numpy(), np.full((2, 2), 7.0))  # outside the slice
    assert s.rounds[2].clip_norm == 1.0


def test_dp_noise_has_the_promised_standard_deviation_on_the_slice_only():
    n = 316  # 316 x 316 + 316 = 100 172 noised values: the sample std is within 0.3 % (1 s.e.), 5 % cannot flake
    big = {"head/kernel": np.zeros((n, n), np.float32), "head/bias": np.zeros(n, np.float32),
           "stem/kernel": np.full(8, 7.0, np.float32)}
    s = SliceFedAvg(model_arrays=big, slice_names={1: ["head/kernel", "head/bias"]}, schedule=PhaseSchedule(1, 0),
                    min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0,
                    dp=DpConfig(mode="client", clip_norm=2.0, noise_multiplier=1.0), num_nodes=3)
    [m, *_] = msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    assert m.content["config"]["clipping_norm"] == 2.0 and m.content["config"]["dp-clipping"] == "fixed"
    tiny = {"head/kernel": big["head/kernel"] + 1e-6, "head/bias": big["head/bias"] + 1e-6}  # an all-zero one is refused
    full, _ = s.aggregate_train(1, [reply(m, tiny, 5, i) for i, m in enumerate(msgs)])
    noise = np.concatenate([full["head/kernel"].numpy().ravel(), full["head/bias"].numpy()]) - 1e-6
    assert np.std(noise) == pytest.approx(2.0 / 3.0, rel=0.05) and abs(np.mean(noise)) < 0.01  # z * C / clients
    np.testing.assert_array_equal(full["stem/kernel"].numpy(), np.full(8, 7.0))


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_dp_noise_is_sized_for_the_updates_averaged_and_only_releases_are_counted(dropout):
    """5 sampled; one fails (and with client_dropout 0.4 two more drop out): the mean of m updates gets noise
    z * C / m, so the multiplier on the sum stays z and epsilon composes Gaussian(z) once per published round."""
    n = 316  # 100 172 noised values: 5 % on the std is about 20 standard errors
    big = {"head/kernel": np.zeros((n, n), np.float32), "head/bias": np.zeros(n, np.float32)}
    s = SliceFedAvg(model_arrays=big, slice_names={1: list(big)}, schedule=PhaseSchedule(2, 0), min_train_nodes=2,
                    min_available_nodes=5, fraction_evaluate=0.0, client_dropout=dropout,
                    dp=DpConfig(mode="server", clip_norm=3.0, noise_multiplier=1.0), num_nodes=5)
    grid = FakeGrid(range(11, 16))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    small = {k: v + 1e-6 for k, v in big.items()}
    replies = [failure(msgs[0])] + [reply(m, small, 1, i) for i, m in enumerate(msgs[1:])]
    full, _ = s.aggregate_train(1, replies)
    m = len(msgs) - 1
    assert m == (2 if dropout else 4) and s.rounds[1].dropped == (2 if dropout else 0)
    noise = np.concatenate([full[k].numpy().ravel() for k in big]) - 1e-6
    assert np.std(noise) == pytest.approx(3.0 / m, rel=0.05)  # not 3 / 5
    assert s._rule.last_stddev == pytest.approx(3.0 / m) and s.dp_releases == 1
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    assert s.aggregate_train(2, [failure(x) for x in msgs[:-1]] + [reply(msgs[-1], small, 1)]) == (None, None)
    assert s.dp_releases == 1  # nothing published in round 2: no epsilon spent
    assert int(s.state_arrays()["dp/releases"]) == 1
    resumed = SliceFedAvg(model_arrays=big, slice_names={1: list(big)}, schedule=PhaseSchedule(2, 0),
                          round_offset=1, dp=DpConfig(mode="server"), num_nodes=5, fraction_evaluate=0.0)
    resumed.load_state_arrays(s.state_arrays())
    assert resumed.dp_releases == 1


def seeded_dp_round(dp: DpConfig | None) -> np.ndarray:
    """One aggregation after seeding the global NumPy RNG as the ServerApp's model build does (training.seed)."""
    s = strategy(dp=dp, num_nodes=3)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    np.random.seed(0)
    full, _ = s.aggregate_train(1, [reply(m, {"head/kernel": np.full((2, 2), 0.1 * (i + 1)), "head/bias": [0.1, 0.2]},
                                          1, i) for i, m in enumerate(msgs)])
    return np.concatenate([full[n].numpy().ravel() for n in HEAD])


@pytest.mark.parametrize("mode, clipping", [("server", "fixed"), ("server", "adaptive"), ("client", "fixed")])
def test_dp_noise_cannot_be_regenerated_from_a_seed_and_non_dp_rounds_stay_reproducible(mode, clipping):
    dp = DpConfig(mode=mode, clipping=clipping, clip_norm=1.0, noise_multiplier=1.0)
    first, second = seeded_dp_round(dp), seeded_dp_round(dp)
    assert not np.any(first == second)  # every coordinate's noise differs between two identical runs
    np.testing.assert_array_equal(seeded_dp_round(None), seeded_dp_round(None))  # without DP: bit for bit


def test_adaptive_clipping_counts_with_secret_noise_and_noises_with_the_norm_it_clipped_with():
    norms = set()
    for _ in range(2):
        s = dp_strategy("server", noise=1.0, clip=0.5, clipping="adaptive")
        np.random.seed(0)
        run_round(s, 1, [{"head/kernel": np.full((2, 2), 5.0), "head/bias": [5.0, 5.0]}] * 3)
        assert s._rule.last_stddev == pytest.approx(s._rule.noise_multiplier * 0.5 / 3)  # the norm before adapting
        assert s._rule.noise_multiplier == pytest.approx(1.0 / np.sqrt(0.75))  # count std = z: 1/z² = 1/zu² + 1/(2z)²
        norms.add(s._rule.clipping_norm)
    assert len(norms) == 2  # the noisy clipped count is not replayed by the global seed either


def test_dp_mean_is_unweighted_and_fedadam_steps_on_the_noised_mean():
    s = dp_strategy("server", noise=0.0, clip=100.0)
    full, _ = run_round(s, 1, [{"head/kernel": np.full((2, 2), v), "head/bias": [v, v]} for v in (0.5, 0.5, 2.0)])
    np.testing.assert_allclose(full["head/bias"].numpy(), [1.0, 1.0])  # not example-weighted (reply() gives 1 each)
    adam = dp_strategy("server", noise=0.0, clip=1.0, cls=SliceFedAdam, eta=0.1)
    run_round(adam, 1, [{"head/kernel": np.full((2, 2), 5.0), "head/bias": [5.0, 5.0]}] * 3)
    clipped = 5.0 / np.sqrt(6 * 25.0)  # each coordinate of the update clipped to norm 1 over 6 coordinates
    np.testing.assert_allclose(adam.m_t["head/bias"], [0.1 * clipped] * 2, rtol=1e-6)  # Adam saw the clipped mean


def test_fedavgm_steps_on_the_clipped_mean_and_phase2_weights_start_without_momentum():
    s = dp_strategy("server", noise=0.0, clip=1.0, cls=SliceFedAvgM, schedule=PhaseSchedule(1, 1), server_momentum=0.5)
    run_round(s, 1, [{"head/kernel": np.full((2, 2), 5.0), "head/bias": [5.0, 5.0]}] * 3)
    clipped = 5.0 / np.sqrt(6 * 25.0)  # each coordinate of the update, clipped to norm 1 over 6 coordinates
    np.testing.assert_allclose(s.model_arrays["head/bias"], [clipped] * 2, rtol=1e-6)  # v = mean update
    s2 = strategy(SliceFedAvgM, schedule=PhaseSchedule(1, 1), server_momentum=0.5)
    run_round(s2, 1, [{n: np.ones_like(model()[n]) for n in HEAD}] * 3)  # v = 1 on the head: w = 1
    full, _ = run_round(s2, 2, [{n: np.full_like(model()[n], 2.0) for n in HEAD + TOP}] * 3)
    np.testing.assert_allclose(full["head/bias"].numpy(), [2.5, 2.5])  # v = 0.5 * 1 + (2 - 1)
    np.testing.assert_allclose(full["top/kernel"].numpy(), np.full(3, 2.0))  # its first step: v = 2 - 0


@pytest.mark.parametrize("cls", [SliceFedAvgM, SliceFedAdam, SliceFedYogi])
def test_server_optimisers_keep_scalar_weights_arrays(cls):
    """ARELU's alpha and beta are 0-d weights: numpy arithmetic on them gives scalars, which Array refuses."""
    s = cls(model_arrays={"arelu/alpha": np.array(0.9, np.float32)}, slice_names={1: ["arelu/alpha"]},
            schedule=PhaseSchedule(1, 0), min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    full, _ = run_round(s, 1, [{"arelu/alpha": np.array(1.0)}] * 2)
    assert full["arelu/alpha"].numpy().shape == () and full["arelu/alpha"].numpy() > 0.9


def test_client_mode_rejects_unclipped_or_zero_updates():
    s = dp_strategy("client", noise=0.0, clip=1.0)
    clipped = {"head/kernel": np.full((2, 2), 0.1), "head/bias": [0.1, 0.1]}  # norm 0.245
    unclipped = {"head/kernel": np.full((2, 2), 3.0), "head/bias": [0.1, 0.1]}
    zero = {"head/kernel": np.zeros((2, 2)), "head/bias": [0.0, 0.0]}
    full, _ = run_round(s, 1, [clipped, unclipped, zero])
    assert full is None  # 1 valid < min_train_nodes = 2
    assert any("above the clipping norm: the node did not clip it" in r for r in s.rounds[1].rejected)
    assert any("exactly zero" in r for r in s.rounds[1].rejected)


# Replies are untrusted input: each malformed reply is refused with a reason, never raised on.
GOOD_ARRAYS = {"head/kernel": np.ones((2, 2), np.float32), "head/bias": np.ones(2, np.float32)}
GOOD_METRICS = {"num-examples": 3, "partition-id": 1, "train-loss": 0.5}


def train_content(arrays=None, metrics=None, **records) -> RecordDict:
    arrays = GOOD_ARRAYS if arrays is None else arrays
    content = {"arrays": ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()}),
               "metrics": MetricRecord(GOOD_METRICS if metrics is None else metrics)}
    return RecordDict({**content, **records})


@pytest.mark.parametrize("content, reason", [
    (train_content(metrics={**GOOD_METRICS, "partition-id": [1, 2]}), "partition-id must be a whole number, got list"),
    (train_content(metrics={**GOOD_METRICS, "partition-id": 2.0}), "partition-id must be a whole number, got float"),
    (train_content(metrics={**GOOD_METRICS, "partition-id": -1}), "partition-id -1 outside"),
    (train_content(metrics={**GOOD_METRICS, "num-examples": 2.5}), "num-examples must be a whole number, got float"),
    (train_content(metrics={**GOOD_METRICS, "num-examples": 0}), "num-examples 0 outside"),
    (train_content(metrics={**GOOD_METRICS, "train-loss": float("nan")}), "train-loss must be a finite number"),
    (train_content(metrics={**GOOD_METRICS, "train-loss": [0.5]}), "train-loss must be a finite number, got list"),
    (train_content(metrics={**GOOD_METRICS, "extra": 1}), "unexpected ['extra']"),
    (train_content(metrics={**GOOD_METRICS, "norm_bit": 1}), "unexpected ['norm_bit']"),  # no DP: not expected
    (train_content(metrics={"num-examples": 3}), "missing ['partition-id']"),
    (train_content(arrays={**GOOD_ARRAYS, "head/kernel": np.full((2, 2), np.nan, np.float32)}), "non-finite values in head/kernel"),
    (train_content(arrays={**GOOD_ARRAYS, "head/kernel": np.ones((3, 2), np.float32)}), "head/kernel has shape (3, 2)"),
    (train_content(arrays={**GOOD_ARRAYS, "head/kernel": np.ones((2, 2), np.int32)}), "head/kernel has dtype int32"),
    (train_content(arrays={**GOOD_ARRAYS, "head/kernel": np.ones((2, 2))}), "head/kernel has dtype float64"),
    (train_content(arrays={"head/bias": GOOD_ARRAYS["head/bias"]}), "missing ['head/kernel']"),
    (train_content(arrays={**GOOD_ARRAYS, "stem/kernel": np.ones((2, 2), np.float32)}), "unexpected ['stem/kernel']"),
    (train_content(arrays={**GOOD_ARRAYS, "head/kernel": Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray",
                                                                data=b"not an npy file")}), "unreadable reply"),
    (train_content(config=ConfigRecord({"a": 1})), "expected ConfigRecord none, got ['config']"),
    (RecordDict({"weights": ArrayRecord({k: Array(v) for k, v in GOOD_ARRAYS.items()}),
                 "metrics": MetricRecord(GOOD_METRICS)}), "expected ArrayRecord ['arrays'], got ['weights']"),
    (RecordDict({"metrics": MetricRecord(GOOD_METRICS)}), "expected ArrayRecord ['arrays'], got none"),
])
def test_a_malformed_train_reply_is_refused_with_its_reason(content, reason):
    from dsl_fed.federated.replies import check_train_reply

    shapes = {"head/kernel": (2, 2), "head/bias": (2,)}
    assert check_train_reply(train_content(), shapes, {"float32"}) is None
    assert reason in check_train_reply(content, shapes, {"float32"})


@pytest.mark.parametrize("metrics, reason", [
    ({"num-examples": 3, "devel-confusion": [1, 0, 0]}, "3 counts, expected 2 x 2"),
    ({"num-examples": 3, "devel-confusion": [1, 0, 2, 0, 0, 0, 0, 0, 0]}, "9 counts, expected 2 x 2"),
    ({"num-examples": 3, "devel-confusion": [1, -1, 3, 0]}, "whole counts >= 0"),
    ({"num-examples": 3, "devel-confusion": [1.0, 0.0, 2.0, 0.0]}, "whole counts >= 0"),
    ({"num-examples": 4, "devel-confusion": [1, 0, 2, 0]}, "num-examples 4 is not the 3 clips"),
    ({"num-examples": 3, "devel-confusion": [1, 0, 2, 0], "devel-uar": 0.5}, "unexpected ['devel-uar']"),
    ({"num-examples": 3}, "missing ['devel-confusion']"),
    ({"num-examples": [3], "devel-confusion": [1, 0, 2, 0]}, "num-examples must be a whole number, got list"),
])
def test_a_malformed_evaluation_reply_is_refused_with_its_reason(metrics, reason):
    from dsl_fed.federated.replies import check_evaluate_reply

    good = RecordDict({"metrics": MetricRecord({"num-examples": 3, "devel-confusion": [1, 0, 2, 0]})})
    assert check_evaluate_reply(good, ["devel"], 2) is None
    assert reason in check_evaluate_reply(RecordDict({"metrics": MetricRecord(metrics)}), ["devel"], 2)


def test_malformed_replies_are_rejected_against_their_node_and_the_run_goes_on(caplog):
    """Two honest nodes and four that send a list as partition-id, NaN weights, float64 arrays, or an extra metric
    (one honest node omits an optional metric: Flower would raise on the differing keys); evaluation replies of
    two nodes are malformed too. Flower's round loop finishes both rounds on the honest updates alone."""
    bad = {13: dict(metrics={"partition-id": [1, 2]}), 14: dict(value=np.nan), 15: dict(dtype=np.float64),
           16: dict(metrics={"surprise": 1.0})}

    def client(node, msg):
        if msg.metadata.message_type == "evaluate":
            counts = [1, 0, 0, 1] if node not in (13, 14) else ([1, 0, 0] if node == 13 else [1.0, 0.0, 0.0, 1.0])
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 2, "devel-confusion": counts})}),
                           reply_to=msg)
        spec = bad.get(node, {})
        arrays = {n: Array(np.full(model()[n].shape, spec.get("value", float(node)), spec.get("dtype", np.float32)))
                  for n in HEAD}
        metrics = {"num-examples": 2, "partition-id": node, **({} if node == 12 else {"train-loss": 0.1}),
                   **spec.get("metrics", {})}
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    s = strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr.dsl_fed"):
        result = s.start(grid=FakeGrid(range(11, 17), client=client), initial_arrays=s.full_record(), num_rounds=2,
                         evaluate_config=ConfigRecord({"classes": ["a", "b"]}))
    for rnd in (1, 2):
        stats = s.rounds[rnd]
        assert stats.updated and sorted(stats.contributors) == [11, 12] and len(stats.rejected) == 4
        assert [r.split(":")[0] for r in sorted(stats.rejected)] == ["node 13", "node 14 (partition 14)",
                                                                    "node 15 (partition 15)", "node 16 (partition 16)"]
    np.testing.assert_array_equal(result.arrays["head/bias"].numpy(), [11.5, 11.5])
    assert s.rounds[1].train_metrics["train-loss"] == pytest.approx(0.1)  # from the node that reported it
    assert "rejected the evaluation of node 13: devel-confusion has 3 counts" in caplog.text
    assert "rejected the evaluation of node 14: devel-confusion must be a list of whole counts" in caplog.text
    assert result.evaluate_metrics_clientapp[2]["devel-confusion"] == pytest.approx([1, 0, 0, 1])  # the 4 valid


class FakeTrainable:
    """A trainable-model source whose bytes name the frozen weights and phase they were made for."""

    def __init__(self):
        self.calls = 0

    def __call__(self, weights, phase):
        import hashlib

        self.calls += 1
        content = f"phase {phase} top {weights['top/kernel'].tolist()}".encode()
        return hashlib.sha256(content).hexdigest(), content


def test_phase2_combines_each_head_weight_over_all_replies_and_each_backbone_weight_over_those_that_carry_it():
    from dsl_fed.federated.protocol import NEEDS_TRAINABLE_MODEL, TRAINABLE_MODEL

    full = {"head/kernel": np.full((2, 2), 1.0), "head/bias": [1, 1], "top/kernel": [2, 2, 2]}

    def client(node, msg):
        if node == 11:  # a Keras node: the whole phase-2 slice
            return reply(msg, full, 1, partition=0)
        if node == 12:  # a LiteRT node: asks for the trainable model, then trains the head alone
            if TRAINABLE_MODEL not in msg.content["config"]:
                return Message(Error(code=NEEDS_TRAINABLE_MODEL, reason="no such model"), reply_to=msg)
            return reply(msg, {"head/kernel": np.full((2, 2), 5.0), "head/bias": [5, 5]}, 3, partition=1)
        return reply(msg, {**full, "top/kernel": [6, 6, 6]}, 3, partition=2)

    s = strategy(schedule=PhaseSchedule(0, 1), trainable=FakeTrainable())
    result = s.start(grid=FakeGrid(client=client), initial_arrays=s.full_record(), num_rounds=1, timeout=7).arrays
    np.testing.assert_allclose(result["head/bias"].numpy(), [(1 + 15 + 3) / 7] * 2, rtol=1e-6)  # all three, by examples
    np.testing.assert_array_equal(result["top/kernel"].numpy(), [(2 + 18) / 4] * 3)  # nodes 11 and 13 only
    assert s.rounds[1].aggregated == 3 and s.rounds[1].head_only == 1 and s.rounds[1].num_examples == 7


def test_phase2_replies_with_part_of_the_backbone_the_head_alone_from_a_keras_node_or_under_dp_are_rejected(caplog):
    s = strategy(schedule=PhaseSchedule(0, 1))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    head = {"head/kernel": np.ones((2, 2)), "head/bias": [1, 1]}
    with caplog.at_level(logging.WARNING):
        s.aggregate_train(1, [reply(msgs[0], {"head/kernel": np.ones((2, 2)), "top/kernel": [1, 1, 1]}, 1, 0),
                              reply(msgs[1], head, 1, 1), reply(msgs[2], {**head, "top/kernel": [1, 1, 1]}, 1, 2)])
    assert len(s.rounds[1].rejected) == 2 and all("weights do not match" in r for r in s.rounds[1].rejected)
    assert s.rounds[1].rejected[1].startswith(f"node {msgs[1].metadata.dst_node_id} ")  # Keras node, head alone
    dp = strategy(schedule=PhaseSchedule(0, 1), dp=DpConfig(mode="server", noise_multiplier=0.0), num_nodes=3)
    msgs = list(dp.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()))
    dp.aggregate_train(1, [reply(m, head, 1, i) for i, m in enumerate(msgs)])
    assert len(dp.rounds[1].rejected) == 3 and not dp.rounds[1].updated


def test_a_litert_node_gets_the_trainable_model_once_per_frozen_part_and_again_when_it_lost_it():
    from dsl_fed.federated.protocol import NEEDS_TRAINABLE_MODEL, TRAINABLE_MODEL, TRAINABLE_SHA

    held: dict[int, str] = {}  # LiteRT node -> sha of the model it holds
    lose = {2: 12}  # round -> node whose cache is wiped before it
    asked = []  # rounds in which the LiteRT node had to ask for the model

    def client(node, msg):
        config = msg.content["config"]
        if node == 11:  # a Keras node
            return reply(msg, {n: np.ones_like(model()[n]) for n in (HEAD if config["phase"] == 1 else HEAD + TOP)}, 1, 0)
        held.pop(lose.pop(config["server-round"], None), None)
        if TRAINABLE_MODEL in config:
            held[node] = config[TRAINABLE_SHA]
        if TRAINABLE_SHA not in config or held.get(node) != config[TRAINABLE_SHA]:
            asked.append(config["server-round"])
            return Message(Error(code=NEEDS_TRAINABLE_MODEL, reason="no such model"), reply_to=msg)
        assert sent_names(msg) == set(HEAD)  # a LiteRT node gets the head alone, in every phase
        return reply(msg, {n: np.full(model()[n].shape, 3.0) for n in HEAD}, 1, node)

    grid = FakeGrid(nodes=(11, 12), client=client)
    grid.sent = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: (grid.sent.extend(messages), send(messages, timeout))[1]
    source = FakeTrainable()
    s = strategy(schedule=PhaseSchedule(2, 2), trainable=source)
    result = s.start(grid=grid, initial_arrays=s.full_record(), num_rounds=4, timeout=7)
    assert all(s.rounds[k].aggregated == 2 and not s.rounds[k].failed for k in (1, 2, 3, 4))
    shipped = [(m.content["config"]["server-round"], m.content["config"][TRAINABLE_SHA][:8])
               for m in grid.sent if TRAINABLE_MODEL in m.content["config"]]
    # round 1: asked (first contact); round 2: asked again (lost it); round 3: the phase-2 model (its learning
    # rate); round 4: the backbone moved in round 3, so a new frozen part
    assert [k for k, _ in shipped] == [1, 2, 3, 4] and asked == [1, 2]  # new models come unasked
    assert shipped[0][1] == shipped[1][1] != shipped[2][1] != shipped[3][1]
    assert s.rounds[4].head_only == 1
    np.testing.assert_array_equal(result.arrays["top/kernel"].numpy(), [1, 1, 1])  # from the Keras node alone
    assert s.rounds[2].bytes_down < s.rounds[1].bytes_down
