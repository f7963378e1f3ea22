"""SapAugment policy driving CutMix and SpecAugment on spectrogram images, as graph-mode TF ops.

The policy (Hu et al., SapAugment; as adapted by DeepSpectrumLite) gives each sample of a batch a strength
``lambda`` from its loss rank: samples the model already finds easy (low loss) are augmented strongly,
the hardest sample not at all. ``lambda`` scales the CutMix patch side, the SpecAugment mask widths and
the execution probability ``p = p_min + (p_max - p_min) * lambda`` of each augmentation.

Everything here works on the normalised images between the model's ``"spectrogram"`` layer and its
``"classifier"`` (see `dsl_fed.models.DslModel.augment`), so nothing of it is part of the inference or
exported graph. Randomness is stateless (``tf.random.stateless_*`` with an explicit ``[2]`` seed): the caller
passes ``[seed, step]``, so every step draws anew and a run with the same seed repeats exactly.

Image layout: ``(B, H, W, C)`` with rows = Mel frequency (high at the top) and columns = time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dsl_fed.config import AugmentConfig
from dsl_fed.spectrogram import SpectrogramImage


def sap_strength(losses: Any, a: float = 0.5, s: float = 10.0) -> tf.Tensor:
    """Per-sample augmentation strength from the loss rank within the batch.

    ``lambda_i = 1 - I_{(r_i + 1) / B}(s (1 - a), s a)`` where ``r_i`` is the rank of sample i by ascending
    loss (0 = lowest loss) and ``I`` the regularised incomplete beta function. With a = 0.5, s = 10 the
    relative ranks 0.25 / 0.5 / 0.75 give 0.951 / 0.5 / 0.049, and the highest loss gives exactly 0.

    Args:
        losses: ``(B,)`` per-sample losses of the un-augmented batch.
        a: Shape parameter: the relative rank at which the strength is 0.5 is ``1 - a``.
        s: Sharpness: larger `s` makes the transition from strong to weak steeper.

    Returns:
        ``(B,)`` float32 strengths in [0, 1].
    """
    losses = tf.reshape(tf.cast(tf.convert_to_tensor(losses), tf.float32), [-1])
    batch = tf.shape(losses)[0]
    order = tf.argsort(losses, stable=True)
    ranks = tf.scatter_nd(order[:, None], tf.range(batch), [batch])
    x = tf.cast(ranks + 1, tf.float32) / tf.cast(batch, tf.float32)
    alpha = tf.fill(tf.shape(x), tf.constant(s * (1.0 - a), tf.float32))
    beta = tf.fill(tf.shape(x), tf.constant(s * a, tf.float32))
    return 1.0 - tf.math.betainc(alpha, beta, x)


def cutmix(
    images: Any,
    labels: Any,
    strength: Any,
    apply: Any,
    min_fraction: float,
    max_fraction: float,
    seed: Any,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Paste a square patch from a random batch partner into each selected image; mix labels by area.

    The patch side is ``round((min_fraction + (max_fraction - min_fraction) * strength) * min(H, W))``
    pixels, placed uniformly at random fully inside the image, so the pasted area fraction is exactly
    ``side^2 / (H W)`` and the labels become ``(1 - area) * own + area * partner``.

    Args:
        images: ``(B, H, W, C)`` float images.
        labels: ``(B, K)`` one-hot (or already soft) labels.
        strength: ``(B,)`` strengths in [0, 1] (`sap_strength`).
        apply: ``(B,)`` bool, which samples get a patch.
        min_fraction: Patch side at strength 0, as a fraction of the image side.
        max_fraction: Patch side at strength 1, as a fraction of the image side.
        seed: ``[2]`` int seed for the stateless random ops.

    Returns:
        ``(images, labels, area)``: the mixed batch and the ``(B,)`` pasted area fraction (0 where not applied).
    """
    images = tf.convert_to_tensor(images)
    labels = tf.cast(tf.convert_to_tensor(labels), images.dtype)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    partner = tf.argsort(tf.random.stateless_uniform([batch], seed=seeds[0]))

    fraction = min_fraction + (max_fraction - min_fraction) * tf.cast(strength, tf.float32)
    side_limit = tf.minimum(height, width)
    side = tf.cast(tf.round(fraction * tf.cast(side_limit, tf.float32)), tf.int32)
    side = tf.clip_by_value(side, 0, side_limit) * tf.cast(apply, tf.int32)
    top = _uniform_int(seeds[1], batch, height - side + 1)
    left = _uniform_int(seeds[2], batch, width - side + 1)

    inside = _band(top, side, height)[:, :, None] & _band(left, side, width)[:, None, :]
    mixed = tf.where(inside[..., None], tf.gather(images, partner), images)
    area = tf.cast(side * side, tf.float32) / tf.cast(height * width, tf.float32)
    area_l = tf.cast(area, labels.dtype)[:, None]
    mixed_labels = (1.0 - area_l) * labels + area_l * tf.gather(labels, partner)
    return mixed, mixed_labels, area


def spec_augment(
    images: Any,
    strength: Any,
    apply: Any,
    max_fraction: float,
    fill: Any,
    seed: Any,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One time mask (columns) and one frequency mask (rows) per selected image.

    Each mask is ``round(max_fraction * strength * side)`` pixels wide, placed uniformly at random inside the
    image, and filled with `fill`: the colour of "no energy" (see `spec_fill`).

    Args:
        images: ``(B, H, W, C)`` float images.
        strength: ``(B,)`` strengths in [0, 1].
        apply: ``(B,)`` bool, which samples get masks.
        max_fraction: Mask width at strength 1, as a fraction of the image side.
        fill: ``(C,)`` per-channel fill value.
        seed: ``[2]`` int seed.

    Returns:
        ``(images, masked)``: the masked batch and a ``(B,)`` bool marking images that got a mask of width > 0.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    scale = max_fraction * tf.cast(strength, tf.float32) * tf.cast(apply, tf.float32)
    time_width = tf.clip_by_value(tf.cast(tf.round(scale * tf.cast(width, tf.float32)), tf.int32), 0, width)
    freq_width = tf.clip_by_value(tf.cast(tf.round(scale * tf.cast(height, tf.float32)), tf.int32), 0, height)
    time_start = _uniform_int(seeds[0], batch, width - time_width + 1)
    freq_start = _uniform_int(seeds[1], batch, height - freq_width + 1)

    masked = _band(freq_start, freq_width, height)[:, :, None] | _band(time_start, time_width, width)[:, None, :]
    fill = tf.reshape(tf.cast(tf.convert_to_tensor(fill), images.dtype), [1, 1, 1, -1])
    out = tf.where(masked[..., None], fill, images)
    return out, (time_width > 0) | (freq_width > 0)


def spec_fill(spectrogram: SpectrogramImage) -> np.ndarray:
    """``(3,)`` SpecAugment fill: the colour of "no energy" in the images `spectrogram` makes.

    That is the colour map's lowest colour (grey level 0, what silence and the dB floor look like) after the
    backbone's ImageNet normalisation: for viridis in DenseNet's "torch" mode ``(lut[0] / 255 - mean) / std`` =
    (-0.9519, -2.0140, -0.3404). Black (RGB 0) never occurs in a viridis image, and literal 0 after
    normalisation would be a mid-grey bar: either would teach the model a colour it never sees at test time.
    """
    return np.asarray(spectrogram.colorize(0.0, normalised=True), dtype=np.float32).reshape(3)


class SapAugment:
    """The configured policy: strengths from losses, then CutMix and/or SpecAugment by execution probability.

    A plain Python object (not a layer): it holds no variables and is attached to a model only for training
    (`dsl_fed.models.DslModel.set_augmentation`), so it is never saved or exported.

    Args:
        cfg: The ``augment`` config section; ``cutmix`` / ``specaugment`` switch the two augmentations.
        fill: ``(3,)`` SpecAugment fill value in the backbone's normalised space: `spec_fill` of the model's
            spectrogram layer.
    """

    def __init__(self, cfg: AugmentConfig, fill: Sequence[float]) -> None:
        self.cfg = cfg
        self.fill = np.asarray(fill, dtype=np.float32).reshape(-1)

    def __eq__(self, other: object) -> bool:
        """Same configuration and fill: the same graph ops (a model re-traces its train step only for another policy)."""
        if not isinstance(other, SapAugment):
            return NotImplemented
        return self.cfg == other.cfg and np.array_equal(self.fill, other.fill)

    def __hash__(self) -> int:
        return hash((self.cfg, self.fill.tobytes()))

    def __call__(self, images: Any, labels: Any, losses: Any, seed: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Augment a batch.

        Args:
            images: ``(B, H, W, C)`` normalised spectrogram images.
            labels: ``(B, K)`` one-hot labels.
            losses: ``(B,)`` per-sample losses of the un-augmented batch.
            seed: ``[2]`` int seed (e.g. ``[base_seed, step]``).

        Returns:
            ``(images, labels, changed)`` where ``changed`` ``(B,)`` marks the samples that differ from the input.
        """
        cfg = self.cfg
        images = tf.convert_to_tensor(images)
        labels = tf.cast(tf.convert_to_tensor(labels), images.dtype)
        strength = sap_strength(losses, cfg.sap_a, cfg.sap_s)
        probability = cfg.p_min + (cfg.p_max - cfg.p_min) * strength
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
        changed = tf.zeros_like(strength, dtype=tf.bool)
        if cfg.cutmix:
            apply = tf.random.stateless_uniform(tf.shape(strength), seed=seeds[0]) < probability
            images, labels, area = cutmix(images, labels, strength, apply, cfg.cutmix_min, cfg.cutmix_max, seeds[1])
            changed = changed | (area > 0)
        if cfg.specaugment:
            apply = tf.random.stateless_uniform(tf.shape(strength), seed=seeds[2]) < probability
            images, masked = spec_augment(images, strength, apply, cfg.specaugment_max, self.fill, seeds[3])
            changed = changed | masked
        return images, labels, changed


def _uniform_int(seed: tf.Tensor, batch: tf.Tensor, upper: tf.Tensor) -> tf.Tensor:
    """``(B,)`` integers uniform in ``[0, upper_i)`` (``upper_i >= 1``)."""
    u = tf.random.stateless_uniform([batch], seed=seed)
    value = tf.cast(tf.floor(u * tf.cast(upper, tf.float32)), tf.int32)
    return tf.minimum(value, upper - 1)


def _band(start: tf.Tensor, width: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """``(B, length)`` bool: positions in ``[start_i, start_i + width_i)``."""
    pos = tf.range(length)[None, :]
    return (pos >= start[:, None]) & (pos < (start + width)[:, None])
