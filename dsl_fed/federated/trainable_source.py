"""The server's trainable ``.tflite`` of its current global model, for the LiteRT nodes.

The server has TensorFlow; a LiteRT node has only the runtime. So the server exports the trainable model
(`dsl_fed.trainable_export.export_trainable`) and ships its bytes in the message (`SliceAggregation`). Its
frozen part (spectrogram + backbone) changes only when the backbone does: never in phase 1 (one export per
run), after every round in phase 2 (the unfrozen top layers move). The head's values inside the file do not
matter - a node ``restore``s the head it is sent - so the export is keyed by the frozen weights and the phase
(whose learning rate the file's optimizer holds) and the last one is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.config import Config


class TrainableSource:
    """``source(weights, phase) -> (sha256, bytes)`` of the trainable model for those full-model weights.

    Args:
        model: The server's Keras model (its weights are set to `weights` before an export).
        cfg: The run's config.
        classes: The run's class names.
        head: The head's weight names (phase 1's slice): everything else is the frozen part.
    """

    def __init__(self, model: Any, cfg: Config, classes: Sequence[str], head: Sequence[str]) -> None:
        self.model, self.cfg, self.classes, self.head = model, cfg, list(classes), set(head)
        self.exports = 0  # how many exports ran (each is a TFLite conversion)
        self._key: str | None = None
        self._value: tuple[str, bytes] = ("", b"")

    def __call__(self, weights: Mapping[str, np.ndarray], phase: int) -> tuple[str, bytes]:
        key = self.frozen_key(weights, phase)
        if key != self._key:
            content = self._export(weights, phase)
            self._key, self._value = key, (hashlib.sha256(content).hexdigest(), content)
        return self._value

    def frozen_key(self, weights: Mapping[str, np.ndarray], phase: int) -> str:
        """sha256 over the phase and every weight outside the head (name, shape and bytes)."""
        digest = hashlib.sha256(f"phase {phase}".encode())
        for name in sorted(set(weights) - self.head):
            array = np.ascontiguousarray(weights[name], dtype=np.float32)
            digest.update(f"{name}:{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def _export(self, weights: Mapping[str, np.ndarray], phase: int) -> bytes:
        from dsl_fed.models import set_weights_by_name
        from dsl_fed.trainable_export import export_trainable

        set_weights_by_name(self.model, dict(weights))
        training = self.cfg.training
        rate = training.learning_rate if phase == 1 else training.phase2_learning_rate
        cfg = dataclasses.replace(self.cfg, training=dataclasses.replace(training, learning_rate=rate))
        with tempfile.TemporaryDirectory(prefix="dsl_fed_trainable_") as tmp:
            path = export_trainable(self.model, Path(tmp) / "model.tflite", classes=self.classes, cfg=cfg,
                                    extra={"phase": phase})
            self.exports += 1
            return path.read_bytes()
