"""Trainable TFLite export: five signatures, builtins only, LiteRT training equal to Keras training, refusals.

One untrained tiny model (``weights: null``, 32x32 images, Adam as in `tiny_config`), exported once through the
CLI with dropout 0 so a LiteRT step and a Keras step can be compared exactly.
"""

import json

import numpy as np
import pytest

from dsl_fed.errors import DslFedError
from dsl_fed.litert import flex_operators
from dsl_fed.litert_training import TrainableRunner

STEP_ATOL = 1e-5  # two optimizer steps, LiteRT vs Keras, any head weight (measured: at most 5e-7, Adam 7e-8)


@pytest.fixture(scope="module")
def trainable(demo_manifest, tmp_path_factory):
    """``(cfg, model, model_path, tflite_path)``: the tiny model saved in a run folder and exported by the CLI."""
    from types import SimpleNamespace

    from conftest import tiny_settings
    from dsl_fed.cli import main
    from dsl_fed.config import from_dict
    from dsl_fed.io import atomic_write
    from dsl_fed.models import build_model

    run_dir = tmp_path_factory.mktemp("trainable_run")
    settings = tiny_settings(demo_manifest, run_dir.parent, run_dir.name)
    settings["model"]["dropout"] = 0.0
    cfg = from_dict(settings)
    model = build_model(cfg, 3)
    model_path = run_dir / "model.keras"
    model.save(model_path)
    atomic_write(run_dir / "config.yaml", cfg.to_yaml())
    assert main(["export", str(model_path), "--trainable"]) == 0
    path = run_dir / "tflite_trainable" / "model.tflite"
    return SimpleNamespace(cfg=cfg, model=model, model_path=model_path, path=path)


def _batch(runner, n=16, seed=0):
    rng = np.random.default_rng(seed)
    audio = rng.uniform(-0.5, 0.5, (n, runner.samples)).astype(np.float32)
    return runner.embed(audio), rng.integers(0, runner.num_classes, n).astype(np.int32)


def test_five_signatures_and_builtin_ops_only(trainable):
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(trainable.path)).get_signature_list()
    assert sorted(signatures) == sorted(["embed", "train", "infer", "parameters", "restore"])
    assert flex_operators(trainable.path) == []
    manifest = json.loads((trainable.path.parent / "manifest.json").read_text())
    assert manifest["kind"] == "trainable" and manifest["flex_ops"] == []
    assert manifest["optimizer"]["name"] == "adam" and manifest["classes"] == ["falling", "flat", "rising"]
    assert manifest["signatures"]["train"]["inputs"]["bottleneck"]["shape"] == [-1, 32]
    assert manifest["signatures"]["train"]["inputs"]["dropout_draws"]["shape"] == [-1, trainable.cfg.model.units]
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert {w["path"] for w in manifest["weights"].values()} >= {"arelu/alpha", "arelu/beta"}


def _keras_steps(model, cfg, x, y, class_weight, steps):
    """`steps` Keras steps of `model`'s head on one batch; returns (losses, {weight key: (before, after)})."""
    import keras

    from dsl_fed.bottleneck import head_model
    from dsl_fed.train import make_optimizer
    from dsl_fed.trainable_export import weight_key

    head = head_model(model)
    head.compile(optimizer=make_optimizer(cfg.training, cfg.training.learning_rate),
                 loss=keras.losses.CategoricalCrossentropy())
    before = {weight_key(v.path): v.numpy().copy() for v in head.trainable_weights}
    onehot = np.eye(len(class_weight), dtype=np.float32)[y]
    losses = [float(head.train_on_batch(x, onehot, sample_weight=class_weight[y])) for _ in range(steps)]
    return losses, {weight_key(v.path): (before[weight_key(v.path)], v.numpy()) for v in head.trainable_weights}


def _check_steps(runner, model, cfg, steps=2):
    """`steps` LiteRT steps equal as many Keras steps (two: the optimizers' slots matter from the second on)."""
    x, y = _batch(runner)
    class_weight = np.array([0.5, 1.0, 2.0], np.float32)
    losses = [runner.train(x, y, class_weight) for _ in range(steps)]
    after = runner.parameters()
    keras_losses, weights = _keras_steps(model, cfg, x, y, class_weight, steps)
    assert sorted(after) == sorted(weights)
    np.testing.assert_allclose(losses, keras_losses, rtol=1e-5)
    worst = max(float(np.max(np.abs(after[key] - keras_after))) for key, (_, keras_after) in weights.items())
    print(f"{cfg.training.optimizer}: max |w_litert - w_keras| after {steps} steps = {worst:.2e}")
    for key, (_, keras_after) in weights.items():
        np.testing.assert_allclose(after[key], keras_after, rtol=0, atol=STEP_ATOL, err_msg=key)
    moved = {key: float(np.max(np.abs(after[key] - before))) for key, (before, _) in weights.items()}
    assert max(moved.values()) > 1e-4, moved  # the steps really moved the weights
    assert moved["arelu_alpha"] > 0 and moved["arelu_beta"] > 0, moved  # ARELU trains too


def test_litert_steps_equal_keras_steps(trainable):
    from dsl_fed.models import load_model

    _check_steps(TrainableRunner(trainable.path), load_model(trainable.model_path), trainable.cfg)


@pytest.mark.parametrize("optimizer", ["adadelta", "sgd"])
def test_the_other_optimizers_equal_keras_too(trainable, optimizer, tmp_path):
    from dsl_fed.models import load_model
    from dsl_fed.trainable_export import build_trainable_module, convert_trainable

    cfg = trainable.cfg.replace(**{"training.optimizer": optimizer, "training.learning_rate": "0.5"})
    model = load_model(trainable.model_path)
    path = tmp_path / "model.tflite"
    path.write_bytes(convert_trainable(build_trainable_module(model, cfg)[0]))
    _check_steps(TrainableRunner(path), model, cfg)


def _seeded_update(path, x, y, seed, steps=3, draws=None):
    """The head after `steps` train steps on one batch by a runner seeded with `seed` (or fed `draws`)."""
    runner = TrainableRunner(path, seed=seed)
    for step in range(steps):
        runner.train(x, y, dropout_draws=None if draws is None else draws[step])
    return runner.parameters()


def test_dropout_masks_follow_the_runners_seed_step_by_step(trainable, tmp_path):
    from dsl_fed.litert import model_operators
    from dsl_fed.models import load_model
    from dsl_fed.trainable_export import build_trainable_module, convert_trainable

    model = load_model(trainable.model_path)
    model.classifier.get_layer("dropout").rate = 0.5
    module, facts = build_trainable_module(model, trainable.cfg)
    assert facts["dropout"] == 0.5
    path = tmp_path / "model.tflite"
    path.write_bytes(convert_trainable(module))
    assert flex_operators(path) == [] and not [op for op in model_operators(path) if op.startswith("RANDOM")]
    runner = TrainableRunner(path, seed=1)
    x, y = _batch(runner)
    same, again, other = (_seeded_update(path, x, y, seed) for seed in (1, 1, 2))
    for key in same:
        np.testing.assert_array_equal(same[key], again[key], err_msg=key)
    assert max(float(np.max(np.abs(same[key] - other[key]))) for key in same) > 1e-4  # other seed, other masks
    rng = np.random.default_rng(1)  # the seed's draws, passed in: the same update, so the draws are the masks
    draws = [rng.random((len(x), runner.hidden_units), dtype=np.float32) for _ in range(3)]
    explicit = _seeded_update(path, x, y, seed=99, draws=draws)
    for key in same:
        np.testing.assert_array_equal(same[key], explicit[key], err_msg=key)
    start = runner.parameters()
    first = runner.train(x, y)
    runner.restore(start)
    assert runner.train(x, y) != first  # the next step draws another mask
    x0, y0 = _batch(TrainableRunner(trainable.path))
    unseeded = [_seeded_update(trainable.path, x0, y0, seed) for seed in (1, 2)]  # dropout 0: the seed is moot
    for key in unseeded[0]:
        np.testing.assert_array_equal(unseeded[0][key], unseeded[1][key], err_msg=key)


def test_twenty_steps_lower_the_loss_and_restore_round_trips(trainable):
    runner = TrainableRunner(trainable.path)
    x, y = _batch(runner, seed=1)
    start = runner.parameters()
    losses = [runner.train(x, y)]
    first_step = runner.parameters()
    losses += [runner.train(x, y) for _ in range(19)]
    # Adam at the tiny config's 0.003 on an untrained tiny CNN's features: 1.106 -> 1.019 (measured)
    assert losses[-1] < 0.95 * losses[0] and np.sum(np.diff(losses) < 0) >= 17, losses
    trained = runner.parameters()
    runner.restore(start)
    assert all(np.array_equal(runner.parameters()[k], v) for k, v in start.items())
    assert runner.train(x, y) == pytest.approx(losses[0], rel=1e-6)
    for key, value in runner.parameters().items():  # restore also reset the optimizer: the first step again
        np.testing.assert_allclose(value, first_step[key], rtol=0, atol=1e-7, err_msg=key)
    runner.restore(trained)
    assert all(np.array_equal(runner.parameters()[k], v) for k, v in trained.items())


def test_restore_with_wrong_names_or_shapes_is_one_line(trainable):
    runner = TrainableRunner(trainable.path)
    weights = runner.parameters()
    bad = dict(weights, hidden_kernel=np.zeros((3, 3), np.float32))
    with pytest.raises(DslFedError, match=r"'hidden_kernel' must have shape \(32, 32\)") as info:
        runner.restore(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(DslFedError, match="missing arelu_beta"):
        runner.restore({k: v for k, v in weights.items() if k != "arelu_beta"})
    with pytest.raises(DslFedError, match="outside the model's classes"):
        runner.train(*_batch(runner)[:1], np.full(16, 3))
    assert all(np.array_equal(runner.parameters()[k], v) for k, v in weights.items())  # nothing was loaded


def test_model_without_the_head_is_refused_in_one_line(tmp_path, trainable, capsys):
    import keras

    from dsl_fed.cli import main

    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="dense")], name="plain")
    plain.save(tmp_path / "plain.keras")
    assert main(["export", str(tmp_path / "plain.keras"), "--trainable", "--config",
                 str(trainable.model_path.parent / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no layer named 'spectrogram'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tflite_trainable").exists()


def test_a_trainable_file_is_refused_where_an_inference_export_is_expected(trainable, demo_manifest, capsys):
    from dsl_fed.cli import main

    wav = next(demo_manifest.parent.rglob("*.wav"))
    assert main(["predict", str(trainable.path), str(wav)]) == 2
    err = capsys.readouterr().err.strip()
    assert "describes a trainable model" in err and len(err.splitlines()) == 1


def test_trainable_takes_no_precision_or_image_input(trainable, capsys):
    from dsl_fed.cli import main

    assert main(["export", str(trainable.model_path), "--trainable", "--quantization", "int8", "--input", "image"]) == 2
    err = capsys.readouterr().err.strip()
    assert "drop --quantization, --input" in err and len(err.splitlines()) == 1


def test_a_trainable_file_whose_train_takes_no_dropout_draws_is_refused_in_one_line(tmp_path):
    import tensorflow as tf

    from dsl_fed.trainable_export import convert_trainable

    spec = lambda shape, name, dtype=tf.float32: tf.TensorSpec(shape, dtype, name=name)  # noqa: E731

    class Older(tf.Module):  # the five signatures as exported before train took dropout_draws
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.zeros([4, 3]))

        @tf.function(input_signature=[spec([None, 4], "audio")])
        def embed(self, audio):
            return {"bottleneck": audio * 2.0}

        @tf.function(input_signature=[spec([None, 4], "bottleneck"), spec([None], "label", tf.int32),
                                      spec([3], "class_weight")])
        def train(self, bottleneck, label, class_weight):
            self.w.assign_add(tf.matmul(tf.transpose(bottleneck), tf.one_hot(label, 3) * class_weight))
            return {"loss": tf.reduce_sum(self.w)}

        @tf.function(input_signature=[spec([None, 4], "bottleneck")])
        def infer(self, bottleneck):
            return {"probabilities": tf.nn.softmax(tf.matmul(bottleneck, self.w))}

        @tf.function(input_signature=[])
        def parameters(self):
            return {"w": tf.identity(self.w)}

        @tf.function(input_signature=[{"w": spec([4, 3], "w")}])
        def restore(self, values):
            self.w.assign(values["w"])
            return {"ok": tf.constant(1, tf.int32)}

    path = tmp_path / "older.tflite"
    path.write_bytes(convert_trainable(Older()))
    with pytest.raises(DslFedError, match=r"older dsl_fed .*export it again") as error:
        TrainableRunner(path)
    assert "\n" not in str(error.value)
