"""SapAugment strengths, CutMix and SpecAugment as TF ops: exact numbers on tiny batches."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import betainc

from dsl_fed.augment import SapAugment, cutmix, sap_strength, spec_augment, spec_fill
from dsl_fed.config import AugmentConfig

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
    batch, size = 32, 10
    images = _constant_images(batch, size, size)
    mixed, _, area = cutmix(images, np.eye(batch), np.ones(batch), np.ones(batch, bool), 0.0, 1.0, SEED)
    np.testing.assert_allclose(area.numpy(), 1.0)  # side = full image: the patch must still fit exactly
    assert mixed.shape == images.shape


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


def test_spec_fill_is_black_after_normalisation():
    np.testing.assert_allclose(spec_fill("torch"), [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(spec_fill("caffe"), [-103.939, -116.779, -123.68], rtol=1e-6)
    np.testing.assert_allclose(spec_fill("tf"), [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(spec_fill("none"), [0.0, 0.0, 0.0])


def _policy_inputs(batch: int = 8):
    images = np.random.default_rng(2).normal(size=(batch, 12, 12, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[np.arange(batch) % 3]
    losses = np.arange(batch, dtype=np.float32)  # sample 7 has the highest loss -> strength 0
    return images, labels, losses


def test_policy_with_zero_probability_changes_nothing():
    images, labels, losses = _policy_inputs()
    policy = SapAugment(AugmentConfig(cutmix=True, specaugment=True, p_min=0.0, p_max=0.0), spec_fill("tf"))
    out, out_labels, changed = policy(images, labels, losses, SEED)
    np.testing.assert_array_equal(out.numpy(), images)
    np.testing.assert_array_equal(out_labels.numpy(), labels)
    assert not changed.numpy().any()


def test_policy_always_on_spares_only_the_hardest_samples():
    images, labels, losses = _policy_inputs()
    cfg = AugmentConfig(cutmix=False, specaugment=True, specaugment_max=0.5, p_min=1.0, p_max=1.0)
    out, _, changed = tf.function(SapAugment(cfg, spec_fill("tf")))(images, labels, losses, SEED)
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
    policy = SapAugment(AugmentConfig(cutmix=True, specaugment=True, p_min=0.5, p_max=1.0), spec_fill("torch"))
    a = policy(images, labels, losses, SEED)
    b = policy(images, labels, losses, SEED)
    c = policy(images, labels, losses, tf.constant([3, 8], tf.int64))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())
