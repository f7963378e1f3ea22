"""Backbone registry, model structure, serialisation, training phases and named weight slices."""

import socket

import keras
import numpy as np
import pytest

from dsl_fed.backbones import BACKBONES, FrozenStatsBatchNormalization, create_backbone, get_spec
from dsl_fed.config import from_dict
from dsl_fed.errors import DslFedError
from dsl_fed.models import (
    DslModel,
    build_model,
    get_weights_by_name,
    set_phase,
    set_weights_by_name,
    trainable_weight_names,
    weight_names,
)

FEATURES = {
    "densenet121": 1024,
    "densenet169": 1664,
    "densenet201": 1920,
    "mobilenet_v2": 1280,
    "mobilenet_v3_small": 576,
    "mobilenet_v3_large": 960,
    "efficientnet_b0": 1280,
    "resnet50": 2048,
    "tiny": 32,
}
PREPROCESS = {"densenet121": "torch", "resnet50": "caffe", "mobilenet_v2": "tf", "mobilenet_v3_small": "tf", "efficientnet_b0": "none"}


def _config(**sections):
    raw = {
        "data": {"manifest": "unused.csv", "chunk_seconds": 0.25},
        "spectrogram": {"image_size": 32, "n_mels": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 16, "dropout": 0.0},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return from_dict(raw)


def _waveforms(n=4, samples=4000, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, samples)).astype(np.float32)


# ------------------------------------------------------------------------------------------ registry


def test_registry_has_the_required_backbones_with_their_preprocessing():
    assert set(FEATURES) <= set(BACKBONES)
    for name, mode in PREPROCESS.items():
        assert get_spec(name).preprocess == mode
        assert get_spec(name).default_size == 224
    assert get_spec("tiny").default_size == 32


def test_the_config_knows_every_registered_backbone_and_refuses_a_typo_without_keras():
    """model.backbone is checked with the config (before a run folder exists), against this very registry."""
    from dsl_fed.config import BACKBONE_NAMES, from_dict

    assert tuple(BACKBONES) == BACKBONE_NAMES
    with pytest.raises(DslFedError, match="model.backbone: unknown value 'densnet121'.*did you mean 'densenet121'"):
        from_dict({"data": {"manifest": "m.csv"}, "model": {"backbone": "densnet121"}})


def test_typo_lists_known_backbones():
    with pytest.raises(DslFedError) as err:
        create_backbone("densenet12", None)
    message = str(err.value)
    assert "did you mean 'densenet121'" in message
    for name in FEATURES:
        assert name in message


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_every_backbone_builds_with_stable_weight_names(name):
    first = create_backbone(name, None, 32)
    second = create_backbone(name, None, 32)  # Keras' per-process name counters have moved on by now
    assert first.name == "backbone" and first.output_shape == (None, FEATURES[name])
    assert [w.path for w in first.weights] == [w.path for w in second.weights]
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    second.set_weights(first.get_weights())
    np.testing.assert_allclose(np.asarray(first(images)), np.asarray(second(images)), rtol=1e-5, atol=1e-6)
    batch_norms = [layer for layer in first.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and all(type(layer) is FrozenStatsBatchNormalization for layer in batch_norms)


def test_too_small_input_is_an_error():
    with pytest.raises(DslFedError, match="at least 32 px"):
        create_backbone("mobilenet_v2", None, 24)


def _offline(monkeypatch, tmp_path):
    """No network (whatever this machine has) and an empty Keras cache."""

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path / "keras_home" / "models"


def test_offline_imagenet_says_where_to_put_the_file(monkeypatch, tmp_path):
    cache = _offline(monkeypatch, tmp_path)
    with pytest.raises(DslFedError) as err:
        create_backbone("densenet121", "imagenet", 32)
    message = str(err.value)
    fname = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert message.startswith("model.weights: cannot download the ImageNet weights of 'densenet121'")
    assert f"to {cache / fname}" in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/densenet/" + fname in message
    assert "set model.weights to the path of that file" in message
    assert "\n" not in message
    assert not (cache / fname).exists()  # no half-downloaded file left behind


def test_imagenet_file_in_the_cache_is_used_without_download(monkeypatch, tmp_path):
    cache = _offline(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    fname = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    (cache / fname).write_bytes(b"not an h5 file")
    with pytest.raises(DslFedError, match=f"model.weights: {cache / fname} does not fit backbone 'mobilenet_v3_small'"):
        create_backbone("mobilenet_v3_small", "imagenet", 32)


def test_weights_from_a_file(tmp_path):
    source = create_backbone("tiny", None, 32)
    source.set_weights([np.full(w.shape, 0.01 * i, np.float32) for i, w in enumerate(source.get_weights())])
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = create_backbone("tiny", str(path), 32)
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DslFedError, match="not found"):
        create_backbone("tiny", str(tmp_path / "missing.weights.h5"), 32)
    with pytest.raises(DslFedError, match="does not fit backbone 'mobilenet_v3_small'"):
        create_backbone("mobilenet_v3_small", str(path), 32)
    with pytest.raises(DslFedError, match="no ImageNet weights"):
        create_backbone("tiny", "imagenet", 32)


# ---------------------------------------------------------------------------------------------- model


def test_model_structure_and_output():
    model = build_model(_config(), 3)
    assert isinstance(model, DslModel)
    assert model.input_shape == (None, 4000) and model.output_shape == (None, 3)
    assert model.spectrogram.name == "spectrogram" and model.spectrogram.preprocess == "tf"
    assert model.classifier.input_shape == (None, 32, 32, 3)
    assert [layer.name for layer in model.classifier.layers] == ["image", "backbone", "hidden", "arelu", "dropout", "predictions"]
    probs = model.predict(_waveforms(), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_backbone_runs_in_inference_mode_during_training():
    """The tiny backbone has BatchNorm: unfrozen and with training=True it would normalise by batch statistics."""
    model = build_model(_config(), 3)
    set_phase(model, 2, "all")
    x = _waveforms(8)
    np.testing.assert_allclose(np.asarray(model(x, training=True)), np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-7)


def test_batchnorm_statistics_unchanged_after_phase2_training_and_after_save_load(tmp_path):
    """Phase 2 trains BatchNorm's gamma/beta but never its moving statistics (plain Keras fit, public API)."""
    model = build_model(_config(), 3)
    set_phase(model, 2, "all")
    stats = ["tiny_bn2/moving_mean", "tiny_bn2/moving_variance"]
    before = get_weights_by_name(model, stats + ["tiny_bn2/gamma"])
    x, y = _waveforms(16), np.eye(3, dtype=np.float32)[np.arange(16) % 3]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = get_weights_by_name(model, stats + ["tiny_bn2/gamma"])
    assert not np.array_equal(after["tiny_bn2/gamma"], before["tiny_bn2/gamma"])
    for name in stats:
        np.testing.assert_array_equal(after[name], before[name])

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.backbone.get_layer("tiny_bn2")) is FrozenStatsBatchNormalization
    set_phase(loaded, 2, "all")
    loaded.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for name, value in get_weights_by_name(loaded, stats).items():
        np.testing.assert_array_equal(value, before[name])


def test_save_load_gives_identical_predictions_and_names(tmp_path):
    model = build_model(_config(model={"dropout": 0.3}), 3)
    set_weights_by_name(model, {"arelu/alpha": np.float32(0.42)})
    x = _waveforms()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DslModel)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert weight_names(loaded) == weight_names(model)
    assert float(get_weights_by_name(loaded, ["arelu/alpha"])["arelu/alpha"]) == pytest.approx(0.42)


def test_same_config_gives_same_initial_weights_and_names():
    cfg = _config()
    a, b = build_model(cfg, 3), build_model(cfg, 3)
    assert weight_names(a) == weight_names(b)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    c = build_model(_config(training={"seed": 1}), 3)
    assert not np.array_equal(a.get_weights()[-2], c.get_weights()[-2])


# --------------------------------------------------------------------------------------------- phases


def test_tiny_phases_and_trainable_names():
    model = build_model(_config(), 3)
    head = ["hidden/kernel", "hidden/bias", "arelu/alpha", "arelu/beta", "predictions/kernel", "predictions/bias"]
    assert trainable_weight_names(model) == head  # build_model starts in phase 1
    set_phase(model, 2, 2)  # tiny_conv3 + tiny_pool
    assert trainable_weight_names(model) == ["tiny_conv3/kernel", "tiny_conv3/bias"] + head
    set_phase(model, 2, 4)  # + tiny_bn2, tiny_relu2: gamma/beta train, moving statistics never do
    assert trainable_weight_names(model) == ["tiny_bn2/gamma", "tiny_bn2/beta", "tiny_conv3/kernel", "tiny_conv3/bias"] + head
    set_phase(model, 2, 0)
    assert trainable_weight_names(model) == head
    set_phase(model, 2, "all")
    assert len(trainable_weight_names(model)) == 8 + 6
    assert "tiny_bn2/moving_mean" in weight_names(model) and "tiny_bn2/moving_mean" not in trainable_weight_names(model)
    set_phase(model, 1)
    assert trainable_weight_names(model) == head


def test_set_phase_errors():
    model = build_model(_config(), 3)
    with pytest.raises(DslFedError, match=r"training.unfrozen_layers: .*\[0, 7\].*got 8"):
        set_phase(model, 2, 8)
    with pytest.raises(DslFedError, match="phase must be 1 or 2"):
        set_phase(model, 3, 0)


def test_densenet121_trainable_counts_per_phase():
    """Golden numbers: DenseNet121 without top has 6,953,856 trainable parameters (Keras documentation)."""
    model = build_model(_config(model={"backbone": "densenet121", "units": 512}), 4)
    # head: Dense 1024x512 + 512, ARELU 2, Dense 512x4 + 4
    head_params = 1024 * 512 + 512 + 2 + 512 * 4 + 4
    expected = {1: (6, head_params), (2, 0): (6, head_params), (2, 298): (260, head_params + 5_755_840),
                (2, "all"): (368, head_params + 6_953_856)}
    for key, (n_weights, n_params) in expected.items():
        if key == 1:
            set_phase(model, 1)
        else:
            set_phase(model, *key)
        assert len(trainable_weight_names(model)) == n_weights, key
        assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == n_params, key
    assert len(model.backbone.layers) == 428
    assert len(weight_names(model)) == 604 + 6


# ----------------------------------------------------------------------------------------- weight I/O


def test_weights_by_name_transfer_a_slice_between_models():
    cfg = _config()
    source = build_model(cfg, 3)
    target = build_model(_config(training={"seed": 5}), 3)
    for model in (source, target):
        set_phase(model, 2, 2)
    x = _waveforms()
    assert not np.allclose(source.predict(x, verbose=0), target.predict(x, verbose=0))
    shared = get_weights_by_name(source)
    assert list(shared) == trainable_weight_names(source)
    set_weights_by_name(target, shared)
    frozen = ["tiny_conv1/kernel", "tiny_conv1/bias", "tiny_conv2/kernel", "tiny_conv2/bias"]
    set_weights_by_name(target, get_weights_by_name(source, frozen + ["tiny_bn2/gamma", "tiny_bn2/beta"]))
    np.testing.assert_allclose(source.predict(x, verbose=0), target.predict(x, verbose=0), rtol=1e-6)


def test_set_weights_by_name_errors_leave_model_untouched():
    model = build_model(_config(), 3)
    before = get_weights_by_name(model)
    with pytest.raises(DslFedError, match="unknown weight name 'hidden/kernal'"):
        set_weights_by_name(model, {"hidden/bias": np.ones(16), "hidden/kernal": np.ones((32, 16))})
    with pytest.raises(DslFedError, match=r"weight 'hidden/kernel': expected shape \(32, 16\), got \(16, 32\)"):
        set_weights_by_name(model, {"hidden/bias": np.ones(16), "hidden/kernel": np.ones((16, 32))})
    for name, value in get_weights_by_name(model).items():
        np.testing.assert_array_equal(value, before[name])
    set_weights_by_name(model, {"hidden/bias": np.ones(16, np.float16)})  # cast to the variable's dtype
    assert get_weights_by_name(model, ["hidden/bias"])["hidden/bias"].dtype == np.float32
