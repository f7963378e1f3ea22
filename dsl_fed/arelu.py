"""ARELU, the attention-based rectified linear unit of Chen et al. (2020), used in the paper's MLP head."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

ALPHA_MIN = 0.01
ALPHA_MAX = 0.99


@keras.saving.register_keras_serializable(package="dsl_fed")
class ARELU(keras.layers.Layer):
    """``f(x) = (1 + sigmoid(beta)) * x`` for ``x >= 0`` and ``clip(alpha, 0.01, 0.99) * x`` for ``x < 0``.

    `alpha` and `beta` are learnable scalars (one pair per layer, as in the paper). The clamp keeps the
    negative slope in (0, 1) and passes no gradient to `alpha` outside that range; ``1 + sigmoid(beta)``
    keeps the positive slope in (1, 2). Built from max/min/sigmoid/mul/add only, so it converts to TFLite
    builtins.

    Args:
        alpha: Initial value of the negative-slope parameter (0.90 in Chen et al.).
        beta: Initial value of the positive-amplification parameter (2.0 in Chen et al.).
    """

    def __init__(self, alpha: float = 0.90, beta: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha_initial = float(alpha)
        self.beta_initial = float(beta)

    def build(self, input_shape: tuple) -> None:
        self.alpha = self.add_weight(name="alpha", shape=(), initializer=keras.initializers.Constant(self.alpha_initial))
        self.beta = self.add_weight(name="beta", shape=(), initializer=keras.initializers.Constant(self.beta_initial))

    def call(self, inputs: Any) -> Any:
        negative_slope = ops.clip(self.alpha, ALPHA_MIN, ALPHA_MAX)
        positive_slope = 1.0 + ops.sigmoid(self.beta)
        return positive_slope * ops.relu(inputs) + negative_slope * ops.minimum(inputs, 0.0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(alpha=self.alpha_initial, beta=self.beta_initial)
        return config
