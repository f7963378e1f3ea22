"""Class weights against imbalance, without TensorFlow: a Keras client and a LiteRT client weigh the loss alike."""

from __future__ import annotations

import numpy as np

__all__ = ["class_weights"]


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """scikit-learn's balanced class weights ``N / (K * n_c)`` over the K classes present; absent classes get 1.0.

    Keras wants a weight for every class index, while a federated shard may lack some classes, which
    ``compute_class_weight`` refuses; those get the neutral 1.0.
    """
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    weights = dict.fromkeys(range(num_classes), 1.0)
    weights.update(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=labels).tolist()))
    return weights
