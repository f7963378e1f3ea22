"""ARELU: values for known x, alpha, beta (incl. the clamp), gradients, serialisation."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsl_fed.arelu import ARELU

X = np.array([[-2.0, -0.5, 0.0, 1.0, 3.0]], dtype=np.float32)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.mark.parametrize(
    "alpha, beta, negative_slope",
    [
        (0.5, 0.0, 0.5),  # positive slope 1 + sigmoid(0) = 1.5
        (0.9, 2.0, 0.9),  # the paper's initial values
        (1.5, 0.0, 0.99),  # clamped from above
        (-0.3, 0.0, 0.01),  # clamped from below
    ],
)
def test_values(alpha, beta, negative_slope):
    layer = ARELU(alpha, beta)
    out = np.asarray(layer(X))
    positive_slope = 1.0 + _sigmoid(beta)
    expected = np.where(X >= 0, positive_slope * X, negative_slope * X)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_known_numbers():
    out = np.asarray(ARELU(0.5, 0.0)(X))
    np.testing.assert_allclose(out, [[-1.0, -0.25, 0.0, 1.5, 4.5]], rtol=1e-6)
    out = np.asarray(ARELU()(np.array([[1.0, -1.0]], np.float32)))
    np.testing.assert_allclose(out, [[1.8807971, -0.9]], rtol=1e-6)


@pytest.mark.parametrize(
    "alpha, beta, d_alpha, d_beta",
    [
        # d/d_alpha sum f = sum(min(x, 0)) = -2.5 inside the clamp range, 0 outside it;
        # d/d_beta sum f = sigmoid'(beta) * sum(max(x, 0)) = 0.25 * 4 at beta = 0.
        (0.5, 0.0, -2.5, 1.0),
        (0.9, 2.0, -2.5, 4 * _sigmoid(2.0) * (1 - _sigmoid(2.0))),
        (1.5, 0.0, 0.0, 1.0),
        (0.001, 0.0, 0.0, 1.0),
    ],
)
def test_gradients(alpha, beta, d_alpha, d_beta):
    layer = ARELU(alpha, beta)
    layer.build(X.shape)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(layer(tf.constant(X)))
    g_alpha, g_beta = tape.gradient(total, [layer.alpha.value, layer.beta.value])
    assert float(g_alpha) == pytest.approx(d_alpha, abs=1e-6)
    assert float(g_beta) == pytest.approx(d_beta, rel=1e-5)


def test_weights_are_trainable_scalars_and_learn():
    layer = ARELU(0.5, 0.0, name="act")
    model = keras.Sequential([keras.Input((5,)), layer])
    assert [w.name for w in model.trainable_weights] == ["alpha", "beta"]
    assert [tuple(w.shape) for w in model.trainable_weights] == [(), ()]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(X, 2 * X, epochs=1, verbose=0)  # the target needs a larger positive and negative slope
    assert float(layer.alpha.numpy()) > 0.5 and float(layer.beta.numpy()) > 0.0


def test_serialisation_round_trip(tmp_path):
    model = keras.Sequential([keras.Input((5,)), ARELU(0.3, -1.0, name="act")])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("act").get_config()["alpha"] == pytest.approx(0.3)
    np.testing.assert_allclose(np.asarray(loaded(X)), np.asarray(model(X)), rtol=0, atol=0)


def test_in_tf_function_and_tf_data():
    layer = ARELU(0.5, 0.0)
    ds = tf.data.Dataset.from_tensor_slices(X).batch(1).map(layer)
    np.testing.assert_allclose(next(iter(ds)).numpy(), [[-1.0, -0.25, 0.0, 1.5, 4.5]], rtol=1e-6)
