"""SapAugment strengths, CutMix and SpecAugment as TF ops: exact numbers on tiny batches."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import betainc

from dsl_fed.augment import SapAugment, cutmix, sap_strength, spec_augment, spec_fill
from dsl_fed.config import AugmentConfig
from dsl_fed.spectrogram import SpectrogramImage

SEED = tf.constant([3, 7], tf.int64)


def test_sap_strength_matches_beta_function_values():
    # ranks of [0.3, 0.1, 0.9, 0.5] are [1, 0, 3, 2] -> relative ranks 0.5, 0.25, 1.0, 0.75
    lam = sap_strength([0.3, 0.1, 0.9, 0.5], a=0.5, s=10.0).numpy()
    np.testing.assert_allclose(lam, [0.5, 0.951, 0.0, 0.049], atol=5e-4)
    np.testing.assert_allclose(lam, 1 - betainc(5, 5, np.array([0.5, 0.25, 1.0, 0.75])), atol=1e-6)


def test_sap_strength_is_monotone_in_loss_rank():
    losses = np.random.default_rng(0).exponential(size=32).astype(np.float32)
    lam = sap_strength(losses, a=0.3, s=6.0).numpy()
    by_loss = lam[np.argsort(losses)]
    assert np.all(np.diff(by_loss) < 0), "higher loss must give strictly weaker augmentation"
    assert by_loss[-1] == pytest.approx(0.0, abs=1e-7) and by_loss[0] > 0.99


def test_sap_strength_in_tf_function_and_tf_data():
    graph = tf.function(lambda x: sap_strength(x, 0.5, 10.0))
    np.testing.assert_allclose(graph(tf.constant([0.3, 0.1, 0.9, 0.5])).numpy(), [0.5, 0.951, 0.0, 0.049], atol=5e-4)
    ds = tf.data.Dataset.from_tensors(tf.constant([2.0, 1.0])).map(lambda x: sap_strength(x, 0.5, 10.0))
    np.testing.assert_allclose(next(iter(ds)).numpy(), [0.0, 1 - betainc(5, 5, 0.5)], atol=1e-6)


def _constant_images(batch: int, height: int, width: int) -> np.ndarray:
    """Image i is filled with the value i, so every pixel tells which sample it came from."""
    return np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, height, width, 3)).copy()


def test_cutmix_patch_area_and_labels():
    batch, size = 6, 16
    images = _constant_images(batch, size, size)
    labels = np.eye(batch, dtype=np.float32)  # sample i has its own class i
    strength = np.array([1.0, 1.0, 0.5, 0.5, 0.0, 1.0], np.float32)
    apply = np.array([True, True, True, True, True, False])
    mixed, mixed_labels, area = (t.numpy() for t in cutmix(images, labels, strength, apply, 0.0, 0.5, SEED))

    # side = round((0 + 0.5 * strength) * 16) -> 8, 8, 4, 4, 0 px; not applied -> 0
    np.testing.assert_allclose(area, [64 / 256, 64 / 256, 16 / 256, 16 / 256, 0.0, 0.0])
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
    for i in range(batch):
        changed = mixed[i, :, :, 0] != i
        if changed.any():
            partner = int(mixed[i][changed][0, 0])
            rows, cols = np.nonzero(changed)
            side = int(round(np.sqrt(area[i] * size * size)))
            assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side  # a square
            assert changed.sum() == side * side
            assert np.all(mixed[i][changed] == partner)
            assert mixed_labels[i, partner] == pytest.approx(changed.mean())  # label share = pasted area
            assert mixed_labels[i, i] == pytest.approx(1 - changed.mean())
        else:  # nothing pasted, or the partner was the sample itself
            assert mixed_labels[i, i] == pytest.approx(1.0)
    np.testing.assert_array_equal(mixed[4:], images[4:])  # strength 0 and apply=False leave images alone


def test_cutmix_patches_stay_inside_the_image():
    """A patch placed partly outside would be cut at the border: every patch must paste exactly side^2 pixels."""
    batch, size = 64, 10
    images = _constant_images(batch, size, size)
    strength = np.random.default_rng(3).uniform(0.0, 1.0, batch).astype(np.float32)
    mixed, _, area = cutmix(images, np.eye(batch), strength, np.ones(batch, bool), 0.0, 1.0, SEED)
    mixed = mixed.numpy()
    sides = np.round(strength * size).astype(int)
    np.testing.assert_allclose(area.numpy(), sides**2 / size**2, rtol=1e-6)
    checked = 0
    for i in range(batch):
        changed = mixed[i, :, :, 0] != i
        if changed.any():  # the partner is another sample
            rows, cols = np.nonzero(changed)
            assert changed.sum() == sides[i] ** 2
            assert np.ptp(rows) + 1 == sides[i] and np.ptp(cols) + 1 == sides[i]
            checked += 1
    assert checked > batch // 2


def test_spec_augment_masks_inside_bounds():
    batch, height, width = 4, 16, 20
    images = np.random.default_rng(1).uniform(1, 2, (batch, height, width, 3)).astype(np.float32)
    fill = np.array([-1.0, -2.0, -3.0], np.float32)
    strength = np.array([1.0, 0.5, 0.0, 1.0], np.float32)
    apply = np.array([True, True, True, False])
    out, masked = spec_augment(images, strength, apply, 0.25, fill, SEED)
    out = out.numpy()
    np.testing.assert_array_equal(masked.numpy(), [True, True, False, False])
    for i, (freq_width, time_width) in enumerate([(4, 5), (2, 2), (0, 0), (0, 0)]):
        filled = np.all(out[i] == fill, axis=-1)
        full_rows = np.nonzero(filled.all(axis=1))[0]
        full_cols = np.nonzero(filled.all(axis=0))[0]
        assert len(full_rows) == freq_width and len(full_cols) == time_width
        if freq_width:
            assert full_rows.max() - full_rows.min() + 1 == freq_width  # one contiguous frequency band
            assert full_cols.max() - full_cols.min() + 1 == time_width  # one contiguous time band
        assert filled.sum() == freq_width * width + time_width * height - freq_width * time_width
        np.testing.assert_array_equal(out[i][~filled], images[i][~filled])


def _fill(preprocess: str, colormap: str = "viridis") -> np.ndarray:
    return spec_fill(SpectrogramImage(image_size=16, colormap=colormap, preprocess=preprocess))


def test_spec_fill_is_the_colour_of_no_energy():
    viridis0 = np.array([0.267004, 0.004874, 0.329415])  # matplotlib's viridis(0), RGB in [0, 1]
    torch = (viridis0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(_fill("torch"), torch, rtol=1e-5)
    np.testing.assert_allclose(_fill("torch"), [-0.95195, -2.01396, -0.34038], atol=1e-5)
    np.testing.assert_allclose(_fill("caffe"), viridis0[::-1] * 255 - [103.939, 116.779, 123.68], rtol=1e-5)
    np.testing.assert_allclose(_fill("tf"), viridis0 * 2 - 1, rtol=1e-5)
    np.testing.assert_allclose(_fill("none", "magma"), [0.3728, 0.1188, 3.5358], atol=1e-3)  # magma: almost black
    np.testing.assert_allclose(_fill("none", "gray"), [0.0, 0.0, 0.0])
    # it is exactly what silence looks like in the model's input
    layer = SpectrogramImage(image_size=16, preprocess="torch")
    silence = layer(np.zeros((1, 16000), np.float32)).numpy()
    np.testing.assert_allclose(silence, np.broadcast_to(_fill("torch"), silence.shape), atol=1e-6)


def _policy_inputs(batch: int = 8):
    images = np.random.default_rng(2).normal(size=(batch, 12, 12, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[np.arange(batch) % 3]
    losses = np.arange(batch, dtype=np.float32)  # sample 7 has the highest loss -> strength 0
    return images, labels, losses


def test_policy_with_zero_probability_changes_nothing():
    images, labels, losses = _policy_inputs()
    policy = SapAugment(AugmentConfig(cutmix=True, specaugment=True, p_min=0.0, p_max=0.0), _fill("tf"))
    out, out_labels, changed = policy(images, labels, losses, SEED)
    np.testing.assert_array_equal(out.numpy(), images)
    np.testing.assert_array_equal(out_labels.numpy(), labels)
    assert not changed.numpy().any()


def test_policy_always_on_spares_only_the_hardest_samples():
    images, labels, losses = _policy_inputs()
    cfg = AugmentConfig(cutmix=False, specaugment=True, specaugment_max=0.5, p_min=1.0, p_max=1.0)
    out, _, changed = tf.function(SapAugment(cfg, _fill("tf")))(images, labels, losses, SEED)
    changed = changed.numpy()
    differs = np.any(out.numpy() != images, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, differs)
    # a mask exists where round(0.5 * strength * 12) > 0: relative ranks 6/8, 7/8, 8/8 (strength 0.049, 0.0013, 0)
    # give widths below half a pixel
    expected = np.round(0.5 * (1 - betainc(5, 5, (np.arange(8) + 1) / 8)) * 12) > 0
    np.testing.assert_array_equal(changed, expected)
    assert expected.sum() == 5


def test_policy_is_reproducible_for_a_seed():
    images, labels, losses = _policy_inputs(16)
    policy = SapAugment(AugmentConfig(cutmix=True, specaugment=True, p_min=0.5, p_max=1.0), _fill("torch"))
    a = policy(images, labels, losses, SEED)
    b = policy(images, labels, losses, SEED)
    c = policy(images, labels, losses, tf.constant([3, 8], tf.int64))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


# ------------------------------------------------------------------------------ inside DslModel.train_step

SAMPLES = 4000  # 0.25 s chunks at 16 kHz


def _tiny(augment: dict, dropout: float = 0.0):
    from dsl_fed.config import from_dict
    from dsl_fed.models import build_model

    cfg = from_dict({
        "data": {"manifest": "unused.csv", "chunk_seconds": 0.25},
        "spectrogram": {"image_size": 32, "n_mels": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 16, "dropout": dropout},
        "augment": {"cutmix": True, "specaugment": True, **augment},
        "training": {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 8, "class_balance": "none",
                     "unfrozen_layers": 3},
    })
    return cfg, build_model(cfg, 3)


def _tone_batch(n: int = 8):
    """Chunk i: a tone of class i % 3 plus noise; one-hot labels."""
    rng = np.random.default_rng(4)
    t = np.arange(SAMPLES) / 16000
    labels = np.arange(n) % 3
    x = np.sin(2 * np.pi * (500 + 1500 * labels)[:, None] * t) + 0.3 * rng.normal(size=(n, SAMPLES))
    return x.astype(np.float32), np.eye(3, dtype=np.float32)[labels]


def test_train_step_takes_the_gradient_on_the_augmented_batch():
    """Probability 1: the step's loss and SGD update are those of the SapAugmented batch (seed [5, 0])."""
    import keras

    from dsl_fed.train import compile_for_phase

    cfg, model = _tiny({"p_min": 1.0, "p_max": 1.0})
    compile_for_phase(model, cfg, phase=1, seed=5)
    x, y = _tone_batch()
    images = model.spectrogram(x)
    clean = model.classifier(images, training=False)
    losses = keras.losses.categorical_crossentropy(y, clean)
    aug, aug_y, changed = SapAugment(cfg.augment, spec_fill(model.spectrogram))(images, y, losses, [5, 0])
    assert changed.numpy().sum() >= 5  # all but the hardest samples: the augmented path is what is checked

    def sgd_step(batch, labels):  # loss and weights after the first SGD step (momentum has no effect yet)
        with tf.GradientTape() as tape:
            loss = keras.losses.CategoricalCrossentropy()(labels, model.classifier(batch, training=True))
        gradients = tape.gradient(loss, model.trainable_weights)
        return float(loss), [w.numpy() - 0.1 * g.numpy() for w, g in zip(model.trainable_weights, gradients)]

    expected_loss, expected = sgd_step(aug, aug_y)
    _, clean_step = sgd_step(images, y)
    assert max(np.abs(a - b).max() for a, b in zip(expected, clean_step)) > 1e-3  # the check below can tell them apart

    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for weight, value in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(weight.numpy(), value, rtol=1e-5, atol=1e-6, err_msg=weight.path)
    assert model.augmentation_steps == 1


def test_loss_ranking_uses_an_inference_mode_pass():
    """With heavy dropout, ranking by a training-mode pass would pick other strengths, hence other patches."""
    import keras

    cfg, model = _tiny({"p_min": 1.0, "p_max": 1.0}, dropout=0.9)
    model.set_augmentation(SapAugment(cfg.augment, spec_fill(model.spectrogram)), seed=3)
    x, y = _tone_batch(16)
    images = model.spectrogram(x)
    got_images, got_labels = model.augment(images, y)
    policy = SapAugment(cfg.augment, spec_fill(model.spectrogram))
    clean = keras.losses.categorical_crossentropy(y, model.classifier(images, training=False))
    want_images, want_labels, _ = policy(images, y, clean, [3, 0])
    np.testing.assert_array_equal(got_images.numpy(), want_images.numpy())
    np.testing.assert_array_equal(got_labels.numpy(), want_labels.numpy())
    noisy = keras.losses.categorical_crossentropy(y, model.classifier(images, training=True))
    assert not np.array_equal(policy(images, y, noisy, [3, 0])[1].numpy(), want_labels.numpy())


@pytest.mark.slow
def test_augmentation_stream_continues_across_epochs_and_phases_and_reruns_exactly(monkeypatch):
    from dsl_fed.data.pipeline import ChunkSet
    from dsl_fed.models import get_weights_by_name
    from dsl_fed.train import train_local

    seeds: list[tuple[int, int]] = []

    class Recording(SapAugment):
        def __call__(self, images, labels, losses, seed):
            tf.py_function(lambda s: seeds.append(tuple(int(v) for v in s.numpy())) or 0, [seed], tf.int32)
            return super().__call__(images, labels, losses, seed)

    monkeypatch.setattr("dsl_fed.train.SapAugment", Recording)
    x, y = _tone_batch(16)
    chunks = ChunkSet(x, y.argmax(1).astype(np.int32), np.arange(16, dtype=np.int32), np.array(["s"] * 16))

    def run() -> dict[str, np.ndarray]:
        cfg, model = _tiny({"p_min": 0.5, "p_max": 1.0})
        train_local(model, chunks, None, cfg, phase=1, epochs=2, verbose=0)  # 2 epochs x 2 steps
        train_local(model, chunks, None, cfg, phase=2, epochs=1, verbose=0)  # recompiled: the stream goes on
        assert model.augmentation_steps == 6
        return get_weights_by_name(model, [w.path for w in model.weights])

    first = run()
    assert seeds == [(0, k) for k in range(6)]  # every step of every epoch and phase draws anew
    seeds.clear()
    again = run()
    assert seeds == [(0, k) for k in range(6)]
    for name in first:
        np.testing.assert_allclose(again[name], first[name], rtol=1e-6, atol=1e-7, err_msg=name)
