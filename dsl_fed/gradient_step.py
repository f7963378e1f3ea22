"""FedSGD's client update: one plain gradient step on all of a node's clips.

A node that trains several local steps on one speaker moves towards that speaker; averaging such moves is not
a step on the federation's loss (with Adam restarted every round each move is close to ``lr * sign(gradient)``,
so the average is a per-weight vote of speakers). One gradient over all the node's clips, sent as the step
``w - g``, makes the server's mean the gradient of the union of the sampled nodes' clips, and a server
optimiser (FedAdam) on it is Adam on mini-batches of whole speakers - what central training does.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dsl_fed.class_balance import class_weights
from dsl_fed.config import Config
from dsl_fed.data import ChunkSet, make_dataset
from dsl_fed.errors import DslFedError
from dsl_fed.models import DslModel


def gradient_step(model: DslModel, chunks: ChunkSet, cfg: Config, phase: int, seed: int) -> float:
    """Replace the phase's trainable weights ``w`` by ``w - g``, `g` the mean loss gradient over `chunks`.

    The loss is training's: class-weighted cross-entropy (``training.class_balance``) with dropout and, if
    configured, SapAugment, in batches of ``training.batch_size`` summed so that the result does not depend on
    the batch size (up to dropout and augmentation draws). Phase 1 runs the frozen backbone here too (no
    embedding cache: a node passes over its clips once per round either way). Returns the mean loss.
    """
    from dsl_fed.train import compile_for_phase  # sets the phase and attaches the augmentation policy

    if len(chunks) == 0:
        raise DslFedError("gradient_step: no training chunks")
    tcfg = cfg.training
    keras.utils.set_random_seed(seed)
    compile_for_phase(model, cfg, phase, seed)
    num_classes = int(model.output_shape[-1])
    weights = np.ones(num_classes, np.float32)
    if tcfg.class_balance == "class_weight":
        weights = np.array([w for _, w in sorted(class_weights(chunks.labels, num_classes).items())], np.float32)
    variables = model.trainable_variables
    step = _batch_gradient(model, tuple(v.path for v in variables))
    totals = [np.zeros(v.shape, np.float32) for v in variables]
    loss = 0.0
    for x, y in make_dataset(chunks, num_classes, tcfg.batch_size):
        batch_loss, grads = step(x, y, tf.constant(weights))
        loss += float(batch_loss)
        for total, grad in zip(totals, grads):
            total += grad.numpy()
    for variable, total in zip(variables, totals):
        variable.assign(variable.numpy() - total / len(chunks))
    return loss / len(chunks)


def _batch_gradient(model: DslModel, key: tuple):
    """The traced ``(x, y, class weights) -> (summed loss, its gradients)`` of `model`'s trainable weights,
    kept on the model per trainable set: a client process answers many rounds with one model."""
    cached = getattr(model, "_dsl_gradient_fn", None)
    if cached is not None and cached[0] == key and cached[1] is model.augmentation:
        return cached[2]
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(x, y, class_weight):
        sample_weight = tf.linalg.matvec(y, class_weight)  # of the clean labels, as Keras' class_weight
        images = model.spectrogram(x)
        if model.augmentation is not None:
            images, y = model.augment(images, y)
        with tf.GradientTape() as tape:
            probs = model.classifier(images, training=True)
            total = tf.reduce_sum(keras.losses.categorical_crossentropy(y, probs) * sample_weight)
        return total, tape.gradient(total, variables)

    model._dsl_gradient_fn = (key, model.augmentation, step)
    return step
