"""A client process reuses its model across messages: every reply equals that of a freshly built model, bit for bit.

The same messages (other nodes, rounds and phases, dropout, SapAugment with CutMix and SpecAugment, FedProx) go
once through one reused model and once with a fresh build per message; the replies must be identical, and the
reused model must not trace its train or predict step again for a message of the phase it ran before.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flower_helpers import run_config, task_identity, write_config  # noqa: F401 (task_identity: autouse fixture)

from dsl_fed.federated import model_cache
from dsl_fed.federated.keras_client import evaluate, train
from dsl_fed.models import DslModel

# (node, round, phase, full model sent): nodes 0/1 get a slice after their first message, node 2 the full model in
# phase 2; node 0's round-4 message comes twice (same seed: the augmentation stream must restart, not go on)
MESSAGES = [(0, 1, 1, True), (1, 2, 1, True), (1, 3, 2, False), (0, 4, 2, False), (0, 4, 2, False), (2, 4, 2, True)]
TIMING_KEYS = {"train-seconds", "work-seconds"}


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    from dsl_fed.data import read_manifest
    from dsl_fed.federated.run_config import config_from_run_config
    from dsl_fed.models import build_model, get_weights_by_name, weight_names

    rc = run_config(write_config(tmp_path_factory.mktemp("reuse"), demo_manifest,
                                 model={"dropout": 0.5}, training={"unfrozen_layers": 4, "batch_size": 8},
                                 augment={"cutmix": True, "specaugment": True}))
    cfg = config_from_run_config(rc)
    model = build_model(cfg, len(read_manifest(cfg.data.manifest).classes))
    return rc, get_weights_by_name(model, weight_names(model))


@pytest.fixture
def traces(monkeypatch):
    """Python runs of the train and predict steps: each is one trace (a traced graph runs without Python)."""
    counts = {"train": 0, "predict": 0}
    for kind, method in (("train", DslModel.train_step), ("predict", DslModel.predict_step)):
        def counted(self, data, kind=kind, method=method):
            counts[kind] += 1
            return method(self, data)
        monkeypatch.setattr(DslModel, f"{kind}_step", counted)
    return counts


def run(rc, full, fresh: bool, traces: dict, **extra) -> tuple[list[dict], list[tuple[int, int]], list[float]]:
    """Send MESSAGES (then an evaluation) to fresh nodes; return the replies' contents, traces and seconds per message."""
    model_cache.clear()
    contexts = {i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": 3},
                           state=RecordDict(), run_config=dict(rc)) for i in range(3)}
    slice_of = {1: [n for n in full if n.startswith(("hidden", "arelu", "predictions"))]}
    slice_of[2] = slice_of[1] + ["tiny_bn2/gamma", "tiny_bn2/beta", "tiny_conv3/kernel", "tiny_conv3/bias"]
    current = dict(full)  # the global model as the server sends it: here the last reply's slice merged in
    replies, trace_log, seconds = [], [], []
    for node, server_round, phase, send_full in MESSAGES + [(1, 5, 2, False)]:
        kind = "evaluate" if server_round == 5 else "train"
        arrays = current if send_full else {n: current[n] for n in slice_of[phase]}
        config = {"server-round": server_round, "phase": phase, "full-model": send_full, **extra}
        msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                                  "config": ConfigRecord(config)}), dst_node_id=100 + node, message_type=kind)
        if fresh:
            model_cache.clear()
        before = dict(traces)
        start = time.perf_counter()
        reply = (train if kind == "train" else evaluate)(msg, contexts[node])
        seconds.append(time.perf_counter() - start)
        trace_log.append((traces["train"] - before["train"], traces["predict"] - before["predict"]))
        assert not reply.has_error()
        content = {f"metrics/{k}": v for k, v in reply.content["metrics"].items() if k not in TIMING_KEYS}
        if kind == "train":
            content.update({f"arrays/{k}": a.numpy() for k, a in reply.content["arrays"].items()})
            current.update({k: a.numpy() for k, a in reply.content["arrays"].items()})  # anchors differ per message
        replies.append(content)
    model_cache.clear()
    return replies, trace_log, seconds


def assert_same_replies(reused: list[dict], fresh: list[dict]) -> None:
    for i, (a, b) in enumerate(zip(reused, fresh, strict=True)):
        assert a.keys() == b.keys(), i
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=f"message {i}: {key}")


@pytest.mark.parametrize("extra", [{}, {"proximal-mu": 0.5}], ids=["fedavg", "fedprox"])
def test_a_reused_model_answers_every_message_as_a_fresh_one_and_traces_once_per_phase(setup, traces, extra, capsys):
    rc, full = setup
    reused, reused_traces, reused_seconds = run(rc, full, fresh=False, traces=traces, **extra)
    fresh, fresh_traces, fresh_seconds = run(rc, full, fresh=True, traces=traces, **extra)
    assert_same_replies(reused, fresh)
    # the messages really differ (other node, round or phase): equality above is not trivial
    assert not np.array_equal(reused[0]["arrays/predictions/kernel"], reused[1]["arrays/predictions/kernel"])
    assert not np.array_equal(reused[2]["arrays/predictions/kernel"], reused[3]["arrays/predictions/kernel"])

    assert all(train >= 1 and predict >= 1 for train, predict in fresh_traces[:-1])  # the counter sees traces
    assert reused_traces[0][0] >= 1 and reused_traces[2][0] >= 1  # first message, and the phase change, trace
    assert [reused_traces[i] for i in (1, 3, 4, 5, 6)] == [(0, 0)] * 5  # same phase (and evaluation): no tracing
    with capsys.disabled():
        print(f"\n[{'+'.join(extra) or 'fedavg'}] seconds per message, fresh build: "
              f"{' '.join(f'{s:.2f}' for s in fresh_seconds)}; reused: {' '.join(f'{s:.2f}' for s in reused_seconds)}"
              f"; traces (train, predict) fresh {fresh_traces}, reused {reused_traces}")


def test_the_reset_is_a_function_of_the_seed_alone(setup):
    """Dropout seed generators and the augmentation stream start where the seed puts them, whatever ran before."""
    from dsl_fed.federated.run_config import config_from_run_config

    rc, _ = setup
    cfg = config_from_run_config(rc)
    model_cache.clear()
    model = model_cache.client_model(cfg, 3, seed=7)
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    assert len(states) == 1  # the head's dropout (the tiny backbone has none)
    first = states[0].numpy().copy()
    assert first.tolist() == [model_cache.stream_seed(7, 0), 0]
    model.get_layer("classifier")(np.zeros((2, 32, 32, 3), np.float32), training=True)  # draws: the state moves
    model._augmentation_steps.assign(5)
    assert states[0].numpy().tolist() != first.tolist()
    assert model_cache.client_model(cfg, 3, seed=7) is model  # reused ...
    assert states[0].numpy().tolist() == first.tolist() and model.augmentation_steps == 0  # ... and reset
    model_cache.client_model(cfg, 3, seed=8)
    assert states[0].numpy().tolist() == [model_cache.stream_seed(8, 0), 0] != first.tolist()  # another stream
    assert model_cache.client_model(cfg, 2, seed=7) is not model  # another class count builds anew
    model_cache.clear()


def test_decoded_clips_are_kept_within_a_byte_budget(setup, monkeypatch):
    from dsl_fed.data.nodes import node_data
    from dsl_fed.federated import keras_client
    from dsl_fed.federated.run_config import config_from_run_config

    rc, _ = setup
    cfg = config_from_run_config(rc)
    monkeypatch.setattr(keras_client, "_DECODED", type(keras_client._DECODED)())
    shards = [node_data({"partition-id": i, "num-partitions": 3}, cfg.data, None) for i in range(3)]
    sizes = [keras_client._nbytes(keras_client._chunks(cfg.data, s, "train")) for s in shards]
    assert len(keras_client._DECODED) == 3 and min(sizes) > 0
    assert keras_client._chunks(cfg.data, shards[0], "train") is keras_client._chunks(cfg.data, shards[0], "train")
    monkeypatch.setattr(keras_client, "DECODED_BYTES", sum(sizes) - 1)
    keras_client._chunks(cfg.data, shards[1], "devel")  # one more clip set: over budget
    order = [shards[1].clips["train"], shards[2].clips["train"], shards[0].clips["train"], shards[1].clips["devel"]]
    kept = [key[1] for key in keras_client._DECODED]
    assert 1 <= len(kept) < 4 and kept == order[4 - len(kept):]  # the least recently used went first
    assert sum(keras_client._nbytes(c) for c in keras_client._DECODED.values()) <= keras_client.DECODED_BYTES


def test_predictions_come_in_one_batch_shape_whatever_the_number_of_chunks(setup, traces):
    """A short last batch is padded: one traced predict step serves shards of every size, rows as without padding."""
    from dsl_fed.federated.run_config import config_from_run_config
    from dsl_fed.predict import predict_batches

    rc, _ = setup
    cfg = config_from_run_config(rc)
    model_cache.clear()
    model = model_cache.client_model(cfg, 3, seed=0)
    x = np.random.default_rng(0).normal(size=(21, cfg.data.chunk_samples)).astype(np.float32)
    for n in (21, 5, 16, 8, 13):
        np.testing.assert_allclose(predict_batches(model, x[:n], batch_size=8), model(x[:n]).numpy(), rtol=1e-5, atol=1e-6)
    assert traces["predict"] == 1
    model_cache.clear()


def test_simulated_nodes_share_one_copy_of_the_model_and_answer_as_with_their_own(setup, traces, monkeypatch):
    """In a simulation process a node's state keeps digests, the process the arrays once; replies are unchanged."""
    from dsl_fed.federated import keras_client

    rc, full = setup
    own, _, _ = run(rc, full, fresh=False, traces=traces)
    monkeypatch.setattr(keras_client, "shares_process", lambda: True)
    monkeypatch.setattr(keras_client, "SHARED_ARRAYS", keras_client.ArrayStore(1 << 30))
    states = []
    monkeypatch.setattr(keras_client, "remember_full_model", _recording(keras_client.remember_full_model, states))
    shared, _, _ = run(rc, full, fresh=False, traces=traces)
    assert_same_replies(shared, own)
    assert states and all(not s.array_records and s.config_records for s in states)  # no node keeps arrays
    store = keras_client.SHARED_ARRAYS
    backbone = [n for n in full if n.startswith("tiny_conv1")]
    assert backbone and all(sum(key[0] == n for key in store._arrays) == 1 for n in backbone)  # one copy per weight

    # a process that never received a node's model asks for it instead of training on something else
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config=dict(rc))
    first = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in full.items()}),
                                "config": ConfigRecord({"server-round": 1, "phase": 1, "full-model": True})}),
                    dst_node_id=7, message_type="train")
    keras_client.remember_full_model(first, context)
    head = {n: full[n] for n in full if n.startswith(("hidden", "arelu", "predictions"))}
    later = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in head.items()}),
                                "config": ConfigRecord({"server-round": 2, "phase": 1, "full-model": False})}),
                    dst_node_id=7, message_type="train")
    assert keras_client.holds_model(context, later)
    store.clear()
    reply = keras_client.handle("train", later, context, None)
    assert reply.has_error() and reply.error.code == keras_client.NEEDS_FULL_MODEL


def _recording(function, states):
    def remember(msg, context):
        function(msg, context)
        states.append(context.state)
    return remember
