"""The ClientApp's reply carries exactly the phase's trainable slice and scalar metrics - never any data."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flower_helpers import run_config, task_identity, write_config  # noqa: F401 (task_identity: autouse fixture)

from dsl_fed.federated.client_app import app
from dsl_fed.federated.keras_client import evaluate, train
from dsl_fed.errors import DslFedError
from dsl_fed.spectrogram import frame_geometry, num_frames
from dsl_fed.federated.run_config import config_from_run_config

HEAD = ["hidden/kernel", "hidden/bias", "arelu/alpha", "arelu/beta", "predictions/kernel", "predictions/bias"]
TOP_4 = ["tiny_bn2/gamma", "tiny_bn2/beta", "tiny_conv3/kernel", "tiny_conv3/bias"]  # 4 top layers: bn2 relu2 conv3 pool


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    """Run config + the server's initial full model (what round 1 sends) for the tiny test model."""
    from dsl_fed.data import read_manifest
    from dsl_fed.models import build_model, get_weights_by_name, weight_names

    # SapAugment on, and 4 unfrozen layers so phase 2 includes a BatchNorm layer
    rc = run_config(write_config(tmp_path_factory.mktemp("client"), demo_manifest,
                                 augment={"cutmix": True, "specaugment": True}, training={"unfrozen_layers": 4}))
    cfg = config_from_run_config(rc)
    model = build_model(cfg, len(read_manifest(cfg.data.manifest).classes))
    full = get_weights_by_name(model, weight_names(model))
    return rc, cfg, full


def message(arrays: dict[str, np.ndarray], kind: str = "train", **config) -> Message:
    config = {"server-round": 1, "phase": 1, "full-model": False, "transfer-dtype": "float32", **config}
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content, dst_node_id=100, message_type=kind)


def node(rc, partition: int = 0, num_partitions: int = 3) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": num_partitions},
                   state=RecordDict(), run_config=dict(rc))


def check_reply_is_only_slice_and_scalars(reply: Message, names: list[str], full: dict, cfg, dtype=np.float32) -> int:
    """Assert the reply holds the named weights (right shapes/dtype) + scalar metrics; return payload bytes."""
    assert not reply.has_error()
    content = reply.content
    assert list(content.keys()) == ["arrays", "metrics"] and not content.config_records
    arrays = content["arrays"]
    assert sorted(arrays.keys()) == sorted(names)
    side = cfg.spectrogram.image_size
    frames = num_frames(cfg.data.chunk_samples, *frame_geometry(cfg.data.sample_rate, cfg.spectrogram.window_ms,
                                                                cfg.spectrogram.hop_fraction))
    for name, array in arrays.items():
        value = array.numpy()
        assert value.shape == full[name].shape and value.dtype == dtype  # a weight of the model, nothing else
        # nothing shaped like an audio chunk, a Mel spectrogram or a spectrogram image
        assert value.size < cfg.data.chunk_samples and frames not in value.shape, (name, value.shape)
        assert value.shape[-3:] != (side, side, 3), (name, value.shape)
    metrics = content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "train-loss", "train-uar", "train-seconds", "work-seconds",
                                   "partition-id"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    return sum(a.numpy().nbytes for a in arrays.values())


def test_phase1_reply_is_exactly_the_head_then_phase2_head_plus_top_layers(setup):
    rc, cfg, full = setup
    ctx = node(rc, partition=1)
    reply = train(message(full, **{"full-model": True}), ctx)
    head_bytes = check_reply_is_only_slice_and_scalars(reply, HEAD, full, cfg)
    # hidden 32x32 + 32, ARELU alpha + beta (scalars), predictions 32x3 + 3 = 1157 float32
    assert head_bytes == 4 * (32 * 32 + 32 + 1 + 1 + 32 * 3 + 3) == 4628
    assert reply.content["metrics"]["partition-id"] == 1 and reply.content["metrics"]["num-examples"] > 0
    assert "dsl_fed-model" in ctx.state.array_records  # the full model stays on the node
    assert not np.allclose(reply.content["arrays"]["hidden/kernel"].numpy(), full["hidden/kernel"])  # it trained

    phase2 = HEAD + TOP_4
    slice_only = {n: full[n] for n in phase2}
    reply = train(message(slice_only, **{"server-round": 2, "phase": 2, "transfer-dtype": "float16"}), ctx)
    bytes16 = check_reply_is_only_slice_and_scalars(reply, phase2, full, cfg, dtype=np.float16)
    # + bn2 gamma/beta 2x16, conv3 3x3x16x32 + 32 = 1157 + 4672 float16
    assert bytes16 == 2 * (1157 + 16 + 16 + 3 * 3 * 16 * 32 + 32) == 11658
    assert "tiny_bn2/moving_mean" not in reply.content["arrays"]  # BatchNorm statistics never travel


def test_a_node_without_the_model_asks_for_it_and_a_node_that_cannot_take_part_says_why_in_one_line(
        setup, tmp_path, caplog):
    """Both are error replies the server acts on, not exceptions (Flower would log a traceback on the node)."""
    import logging

    from dsl_fed.federated.protocol import NEEDS_FULL_MODEL, NODE_FAILED

    rc, _, full = setup
    for kind in ("train", "evaluate"):  # a restarted SuperNode: same node, empty state
        reply = app(message({n: full[n] for n in HEAD}, kind=kind), node(rc))
        assert reply.has_error() and reply.error.code == NEEDS_FULL_MODEL
    missing = Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path / "node_3")}, state=RecordDict(),
                      run_config=dict(rc))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr.dsl_fed"):
        reply = app(message(full, **{"full-model": True, "classes": ["falling", "flat", "rising"]}), missing)
    assert reply.has_error() and reply.error.code == NODE_FAILED
    assert reply.error.reason == f"data-path {tmp_path / 'node_3'}: does not exist"
    ours = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "flwr.dsl_fed" and r.levelno >= logging.WARNING]
    assert ours == [("ERROR", f"[dsl_fed] node 7: {reply.error.reason}")]


def test_same_round_and_node_give_the_same_update_other_rounds_differ(setup):
    rc, _, full = setup
    first = train(message(full, **{"full-model": True}), node(rc))
    again = train(message(full, **{"full-model": True}), node(rc))
    later = train(message(full, **{"full-model": True, "server-round": 2}), node(rc))
    a, b, c = (r.content["arrays"]["predictions/kernel"].numpy() for r in (first, again, later))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fedprox_proximal_term_keeps_the_update_near_the_global_weights(setup):
    rc, _, full = setup
    drift = {}
    for mu in (0.0, 50.0):
        reply = train(message(full, **{"full-model": True, "proximal-mu": mu}), node(rc))
        drift[mu] = sum(float(np.sum((reply.content["arrays"][n].numpy() - full[n]) ** 2)) for n in HEAD)
    assert drift[50.0] < 0.5 * drift[0.0]


def test_evaluate_without_held_out_clips_reports_zero_examples_and_keeps_the_model(setup):
    rc, _, full = setup
    ctx = node(rc, partition=2)  # the demo corpus' 2 devel speakers go to nodes 0 and 1
    reply = evaluate(message(full, kind="evaluate", **{"full-model": True}), ctx)
    assert dict(reply.content["metrics"]) == {"num-examples": 0, "devel-confusion": [0] * 9}
    assert "dsl_fed-model" in ctx.state.array_records  # a later slice-only train message can build on it


def test_evaluate_returns_the_confusion_counts_of_the_nodes_own_devel_clips(setup):
    """Counts, not a UAR: their sum over nodes is the confusion matrix of all devel clips together."""
    from dsl_fed.data import load_chunks
    from dsl_fed.data.nodes import node_data
    from dsl_fed.federated.keras_client import global_model
    from dsl_fed.metrics import confusion
    from dsl_fed.predict import predict_clips

    rc, cfg, full = setup
    ctx = node(rc, partition=0)
    msg = message(full, kind="evaluate", **{"full-model": True, "evaluate-test": True,
                                              "classes": ["falling", "flat", "rising"]})
    metrics = evaluate(msg, ctx).content["metrics"]
    data = node_data(ctx.node_config, cfg.data, ["falling", "flat", "rising"])
    assert {c.speaker for c in data.clips["devel"]} == {"spk01"} and {c.speaker for c in data.clips["test"]} == {"spk03"}
    model = global_model(cfg, 3, msg, ctx, seed=0)
    for part in ("devel", "test"):
        _, probs, labels, _ = predict_clips(model, load_chunks(data.clips[part], cfg.data, data.classes, progress=False))
        assert metrics[f"{part}-confusion"] == confusion(labels, probs.argmax(axis=1), 3).reshape(-1).tolist()
    assert metrics["num-examples"] == len(data.clips["devel"]) + len(data.clips["test"]) == 18


def test_a_training_message_that_asks_to_evaluate_first_scores_the_model_it_brought_before_training(setup):
    """In a deployment a round's evaluation rides in the next round's training message: the reply's evaluation
    record equals what an evaluation message with the same model gets, and its update equals a plain one."""
    from dsl_fed.federated.protocol import EVALUATE_FIRST, EVALUATION

    rc, cfg, full = setup
    classes = {"classes": ["falling", "flat", "rising"], "evaluate-test": True}
    plain = train(message(full, **{"full-model": True}, **classes), node(rc, partition=0))
    both = train(message(full, **{"full-model": True, EVALUATE_FIRST: True}, **classes), node(rc, partition=0))
    alone = evaluate(message(full, kind="evaluate", **{"full-model": True}, **classes), node(rc, partition=0))
    assert dict(both.content[EVALUATION]) == dict(alone.content["metrics"])
    assert dict(both.content[EVALUATION])["num-examples"] == 18
    assert EVALUATION not in plain.content
    for name in plain.content["arrays"].keys():
        np.testing.assert_array_equal(both.content["arrays"][name].numpy(), plain.content["arrays"][name].numpy())


def test_a_label_outside_the_run_classes_fails_the_node_naming_label_and_node(setup):
    rc, _, full = setup
    msg = message(full, **{"full-model": True, "classes": ["falling", "rising"]})
    with pytest.raises(DslFedError, match=r"^node 100: .*label 'flat' is not one of the run's classes \(falling, rising\)"):
        train(msg, node(rc))


def test_routing_through_the_client_app_and_a_wrong_federation_size(setup):
    rc, _, full = setup
    reply = app(message(full, **{"full-model": True}), node(rc))
    assert sorted(reply.content["arrays"].keys()) == sorted(HEAD)
    with pytest.raises(DslFedError, match="num-supernodes=3"):
        train(message(full, **{"full-model": True}), node(rc, partition=0, num_partitions=4))


def test_unfrozen_batchnorm_keeps_its_statistics_so_the_slice_is_the_whole_update(setup, tmp_path):
    """Keras 3 passes fit's training=True into the backbone: plain BatchNorm would then update moving
    statistics that never travel, and the server's model (initial statistics) scored at chance."""
    import keras

    from dsl_fed.data import load_chunks
    from dsl_fed.data.nodes import node_data
    from dsl_fed.models import build_model, get_weights_by_name, set_phase, trainable_weight_names, weight_names
    from dsl_fed.train import train_local

    _, cfg, full = setup
    data = node_data({"partition-id": 0, "num-partitions": 3}, cfg.data, None)
    classes = data.classes
    chunks = load_chunks(data.clips["train"], cfg.data, classes, progress=False)
    model = build_model(cfg, len(classes))
    set_phase(model, 2, cfg.training.unfrozen_layers)
    assert "tiny_bn2/gamma" in trainable_weight_names(model)
    train_local(model, chunks, None, cfg, 2, epochs=1, verbose=0)
    after = get_weights_by_name(model, weight_names(model))
    changed = {n for n in after if not np.array_equal(after[n], full[n])}
    assert "tiny_bn2/gamma" in changed and changed <= set(trainable_weight_names(model))
    model.save(tmp_path / "m.keras")  # a loaded model keeps the backbone in inference mode too
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    set_phase(loaded, 2, cfg.training.unfrozen_layers)
    train_local(loaded, chunks, None, cfg, 2, epochs=1, verbose=0)
    assert np.array_equal(loaded.get_layer("classifier").get_layer("backbone").get_layer("tiny_bn2").moving_mean.numpy(),
                          full["tiny_bn2/moving_mean"])


@pytest.mark.slow  # a fresh Python process importing TensorFlow: ~5-10 s
def test_thread_limits_take_effect_before_the_first_op_and_say_so_when_too_late():
    """Run in a fresh process: TensorFlow fixes its thread pools at its first op (pytest's process ran many)."""
    import subprocess
    import sys

    script = (
        "import tensorflow as tf\n"
        "from dsl_fed.federated.keras_client import limit_threads\n"
        "assert limit_threads(1)\n"
        "tf.linalg.matmul(tf.ones((64, 64)), tf.ones((64, 64)))\n"
        "assert (tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads()) == (1, 1)\n"
        "assert limit_threads(1) and not limit_threads(2)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert "the limit of 2 (federated.client_cpus) cannot apply" in out.stderr


def test_a_deployed_node_reports_its_random_folder_id_and_a_simulated_node_its_share(tmp_path):
    from dsl_fed.data.nodes import NODE_ID_FILE
    from dsl_fed.federated.node_identity import client_id

    deployed = Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path)}, state=RecordDict(), run_config={})
    first = client_id(deployed)
    assert first == client_id(deployed) == int((tmp_path / NODE_ID_FILE).read_text())
    assert client_id(node({}, partition=2)) == 2
    (tmp_path / NODE_ID_FILE).write_text("x")
    with pytest.raises(DslFedError, match=r"^node 7: .*not a node id"):
        client_id(deployed)


def test_a_gradient_node_replies_with_one_step_on_its_mean_gradient_and_its_loss(demo_manifest, tmp_path):
    """``local_update: gradient``: the reply is ``w - g`` over the node's own clips (the step `gradient_step` takes
    with the node's seed), metrics without a local UAR."""
    from dsl_fed.data import read_manifest
    from dsl_fed.federated.keras_client import local_data, train_chunks
    from dsl_fed.federated.node_identity import client_seed
    from dsl_fed.gradient_step import gradient_step
    from dsl_fed.models import build_model, get_weights_by_name, set_weights_by_name, weight_names

    rc = run_config(write_config(tmp_path, demo_manifest, model={"dropout": 0.0},
                                 federated={"local_update": "gradient", "strategy": "fedadam"}))
    cfg = config_from_run_config(rc)
    classes = read_manifest(cfg.data.manifest).classes
    model = build_model(cfg, len(classes))
    full = get_weights_by_name(model, weight_names(model))
    ctx = node(rc, partition=1)
    reply = train(message(full, **{"full-model": True, "server-round": 3}), ctx)
    assert set(reply.content["metrics"].keys()) == {"num-examples", "train-loss", "train-seconds", "work-seconds",
                                                    "partition-id"}
    chunks = train_chunks(cfg, local_data(cfg, ctx, {}), 1)
    assert reply.content["metrics"]["num-examples"] == len(chunks)
    reference = build_model(cfg, len(classes))
    set_weights_by_name(reference, full)
    loss = gradient_step(reference, chunks, cfg, 1, client_seed(cfg.training.seed, 3, 1))
    assert reply.content["metrics"]["train-loss"] == pytest.approx(loss, rel=1e-5)
    expected = get_weights_by_name(reference, HEAD)
    for name in HEAD:
        sent = reply.content["arrays"][name].numpy()
        np.testing.assert_allclose(sent, expected[name], atol=1e-6, err_msg=name)
    assert not np.allclose(reply.content["arrays"]["hidden/kernel"].numpy(), full["hidden/kernel"])
