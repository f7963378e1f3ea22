"""Partial aggregation by weight name: exact numbers on hand-made arrays, with a fake Grid (no Flower runtime)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from dsl_fed.config import FederatedConfig
from dsl_fed.federated.strategy import PhaseSchedule, SliceFedAdam, SliceFedAvg, SliceFedYogi, aggregate_client_metrics, make_strategy

HEAD = ["head/kernel", "head/bias"]
TOP = ["top/kernel"]


def model() -> dict[str, np.ndarray]:
    return {
        "stem/kernel": np.full((2, 2), 7.0, np.float32),  # never trained: must never change or travel after round 1
        "top/kernel": np.zeros((3,), np.float32),
        "head/kernel": np.zeros((2, 2), np.float32),
        "head/bias": np.zeros((2,), np.float32),
    }


class FakeGrid:
    """The part of `flwr.serverapp.Grid` that strategies use, answering with `client(node, message)`."""

    def __init__(self, nodes=(11, 12, 13), client=None):
        self.nodes = list(nodes)
        self.client = client

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        return [self.client(m.metadata.dst_node_id, m) for m in messages]


def reply(msg: Message, arrays: dict[str, np.ndarray], num_examples: float, partition: int = 0, **metrics) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "partition-id": partition, **metrics}),
    })
    return Message(content, reply_to=msg)


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
    assert set(state) == {f"{a}/{n}" for a in ("m_t", "v_t") for n in HEAD + TOP}
    fresh = strategy(cls, eta=0.1)
    fresh.load_state_arrays(state)
    np.testing.assert_array_equal(fresh.v_t["top/kernel"], s.v_t["top/kernel"])


def test_make_strategy_maps_the_config():
    fed = FederatedConfig(strategy="fedprox", proximal_mu=0.5, min_train_nodes=2, min_available_nodes=3)
    s = make_strategy(fed, model(), {1: HEAD, 2: HEAD + TOP})
    [m, *_] = s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid())
    assert m.content["config"]["proximal-mu"] == 0.5 and s.min_available_nodes == 3
    adam = make_strategy(FederatedConfig(strategy="fedadam", server_learning_rate=0.02), model(), {1: HEAD, 2: HEAD})
    assert isinstance(adam, SliceFedAdam) and adam.eta == 0.02


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
