"""Running a trainable export (`dsl_fed.trainable_export`) with LiteRT alone: embed, train, infer, weights in/out.

Imports numpy and ``ai_edge_litert`` only, never TensorFlow, so a phone-like client process can use it. Every
input is checked here (names, shapes, label range) so a mistake is one clear line, not a kernel error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.errors import DslFedError, first_line

__all__ = ["TrainableRunner"]

SIGNATURES = ("embed", "train", "infer", "parameters", "restore")


class TrainableRunner:
    """One trainable ``.tflite`` in a LiteRT interpreter (its variables live as long as this object).

    Args:
        path: The trainable ``.tflite`` file.
        threads: CPU threads for the interpreter's kernels; None lets LiteRT decide.
        seed: Seed of the dropout masks `train` draws (numpy's generator, one draw per step): the same seed
            gives the same masks step by step; None takes fresh entropy from the OS.
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 seed: int | Sequence[int] | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from dsl_fed.litert import without_delegate_notice

        self.path = Path(path)
        if not self.path.is_file():
            raise DslFedError(f"{self.path}: model file not found")
        try:
            with warnings.catch_warnings(), without_delegate_notice():
                warnings.simplefilter("ignore")
                self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
                found = sorted(self._interpreter.get_signature_list())
                if sorted(SIGNATURES) != found:
                    raise DslFedError(f"{self.path}: not a trainable dsl_fed model (signatures "
                                      f"{', '.join(found) or 'none'}; expected {', '.join(SIGNATURES)})")
                self._runners = {name: self._interpreter.get_signature_runner(name) for name in SIGNATURES}
        except (ValueError, RuntimeError) as exc:
            raise DslFedError(f"{self.path}: not a loadable TFLite model ({first_line(exc)})") from None
        self._invoked: set[str] = set()
        restore = self._runners["restore"].get_input_details()
        self.weight_shapes = {name: tuple(int(d) for d in detail["shape"]) for name, detail in restore.items()}
        train = self._runners["train"].get_input_details()
        if "dropout_draws" not in train:
            raise DslFedError(f"{self.path}: trainable model from an older dsl_fed (its train signature takes no "
                              "dropout_draws); export it again with `dsl_fed export MODEL --trainable`")
        self.num_classes = int(train["class_weight"]["shape"][0])
        self.bottleneck_dim = int(train["bottleneck"]["shape_signature"][-1])
        self.hidden_units = int(train["dropout_draws"]["shape_signature"][-1])
        self._rng = np.random.default_rng(seed)
        self.samples = int(self._runners["embed"].get_input_details()["audio"]["shape_signature"][-1])

    def signature_io(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """Inputs and outputs of every signature: name -> {shape (-1 = any batch), dtype}, for the manifest."""
        def describe(details: dict[str, Any]) -> dict[str, Any]:
            return {name: {"shape": [int(d) for d in d_["shape_signature"]], "dtype": np.dtype(d_["dtype"]).name}
                    for name, d_ in sorted(details.items())}

        return {name: {"inputs": describe(r.get_input_details()), "outputs": describe(r.get_output_details())}
                for name, r in self._runners.items()}

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """Waveform chunks ``(B, samples)`` -> bottleneck features ``(B, D)``."""
        audio = self._batch(audio, (self.samples,), "audio")
        return self._run("embed", audio=audio)["bottleneck"]

    def train(self, bottleneck: np.ndarray, labels: np.ndarray, class_weight: np.ndarray | None = None,
              dropout_draws: np.ndarray | None = None) -> float:
        """One optimizer step on the head; returns the batch loss before the step.

        Args:
            bottleneck: ``(B, D)`` features from `embed`.
            labels: ``(B,)`` class indices in ``[0, C)``.
            class_weight: ``(C,)`` loss weight per class; None = all ones.
            dropout_draws: ``(B, H)`` uniform draws in [0, 1) that decide the dropout mask (a unit is kept where
                its draw is at least the rate); None draws them from the runner's seeded generator.
        """
        x = self._batch(bottleneck, (self.bottleneck_dim,), "bottleneck")
        y = np.asarray(labels)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DslFedError(f"{self.path}: labels must be {len(x)} integer class indices, got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise DslFedError(f"{self.path}: label {int(y.max() if y.max() >= self.num_classes else y.min())} is "
                              f"outside the model's classes 0..{self.num_classes - 1}")
        w = np.ones(self.num_classes, np.float32) if class_weight is None else np.asarray(class_weight, np.float32)
        if w.shape != (self.num_classes,):
            raise DslFedError(f"{self.path}: class_weight must have shape ({self.num_classes},), got {w.shape}")
        if dropout_draws is None:
            draws = self._rng.random((len(x), self.hidden_units), dtype=np.float32)
        else:
            draws = self._batch(dropout_draws, (self.hidden_units,), "dropout_draws")
            if len(draws) != len(x):
                raise DslFedError(f"{self.path}: dropout_draws must have {len(x)} rows, got {len(draws)}")
        return float(self._run("train", bottleneck=x, label=y.astype(np.int32), class_weight=w,
                               dropout_draws=draws)["loss"])

    def infer(self, bottleneck: np.ndarray) -> np.ndarray:
        """Bottleneck features ``(B, D)`` -> class probabilities ``(B, C)``."""
        x = self._batch(bottleneck, (self.bottleneck_dim,), "bottleneck")
        return self._run("infer", bottleneck=x)["probabilities"]

    def parameters(self) -> dict[str, np.ndarray]:
        """The head's current weights by key (copies)."""
        return {name: np.array(value) for name, value in self._run("parameters").items()}

    def restore(self, weights: dict[str, Any]) -> None:
        """Load the head's weights (all keys, exact shapes) and reset the optimizer.

        Raises:
            DslFedError: a missing or unknown key, or a wrong shape (checked before anything is loaded).
        """
        missing = sorted(set(self.weight_shapes) - set(weights))
        unknown = sorted(set(weights) - set(self.weight_shapes))
        if missing or unknown:
            raise DslFedError(f"{self.path}: restore needs exactly the head weights {', '.join(sorted(self.weight_shapes))}"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        arrays = {}
        for name, value in weights.items():
            array = np.asarray(value, dtype=np.float32)
            if array.shape != self.weight_shapes[name]:
                raise DslFedError(f"{self.path}: weight {name!r} must have shape {self.weight_shapes[name]}, "
                                  f"got {array.shape}")
            arrays[name] = array
        self._run("restore", **arrays)

    def _batch(self, x: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
        array = np.asarray(x, dtype=np.float32)
        if array.ndim != len(shape) + 1 or array.shape[1:] != shape or len(array) == 0:
            raise DslFedError(f"{self.path}: {what} must be a non-empty batch of shape (B, {', '.join(map(str, shape))}), "
                              f"got {array.shape}")
        return array

    def _run(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        from dsl_fed.litert import without_delegate_notice

        try:
            if name in self._invoked:
                return self._runners[name](**inputs)
            with without_delegate_notice():  # LiteRT applies its XNNPACK delegate (and says so) at a first invoke
                outputs = self._runners[name](**inputs)
            self._invoked.add(name)
            return outputs
        except (ValueError, RuntimeError) as exc:
            raise DslFedError(f"{self.path}: {name} failed ({first_line(exc)})") from None


def train_epochs(runner, x: np.ndarray, y: np.ndarray, class_weight: np.ndarray | None, batch_size: int, epochs: int,
                 seed: int) -> float:
    """`epochs` passes of ``train`` over shuffled batches; the last epoch's loss, batch-size weighted as Keras logs it.

    Raises:
        DslFedError: the loss is not finite (as the Keras client's guard does).
    """
    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for begin in range(0, len(x), batch_size):
            batch = order[begin:begin + batch_size]
            total += runner.train(x[batch], y[batch], class_weight) * len(batch)
        loss = total / len(x)
        if not np.isfinite(loss):
            raise DslFedError(f"training diverged: loss {loss} (lower training.learning_rate)")
    return loss
