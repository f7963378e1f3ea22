"""The DeepSpectrumLite model, its two training phases and named weight slices.

Structure (every layer explicitly named, so weight names are identical in every process)::

    waveform (B, chunk_samples)
      -> "spectrogram"  SpectrogramImage            (no trainable weights)
      -> "classifier"   keras.Model, input "image" (B, S, S, 3):
            "backbone" -> "hidden" Dense(units) -> "arelu" ARELU
            -> "dropout" Dropout -> "predictions" Dense(C, softmax)

The seam between ``"spectrogram"`` and ``"classifier"`` is where `DslModel.train_step` applies SapAugment;
inference (``model(x)``, ``predict``, TFLite export of the Functional graph) never sees augmentation.
The backbone's BatchNorm layers always run in inference mode (`dsl_fed.backbones.FrozenStatsBatchNormalization`):
they keep their ImageNet statistics even when unfrozen (the usual Keras fine-tuning practice), so moving
statistics never need federated averaging.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from dsl_fed.arelu import ARELU
from dsl_fed.augment import SapAugment
from dsl_fed.backbones import BACKBONE_LAYER_NAME, create_backbone, get_spec
from dsl_fed.config import Config
from dsl_fed.errors import DslFedError, first_line
from dsl_fed.spectrogram import spectrogram_layer

SPECTROGRAM_LAYER = "spectrogram"
CLASSIFIER_LAYER = "classifier"


@keras.saving.register_keras_serializable(package="dsl_fed")
class DslModel(keras.Model):
    """A Functional model whose ``train_step`` can apply SapAugment between spectrogram and classifier.

    Built like any Functional model (``DslModel(inputs, outputs, name=...)``) and saved/loaded as one.
    Without an augmentation policy, `train_step` is numerically the standard Keras step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._augmentation: SapAugment | None = None
        # Plain tf.Variables, not Keras weights: never saved, exported or sent; survive recompiling. Variables (not
        # Python numbers) so that a traced train step serves every seed.
        self._augmentation_seed = tf.Variable(0, dtype=tf.int64, trainable=False, name="augmentation_seed")
        self._augmentation_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="augmentation_steps")

    @property
    def spectrogram(self) -> keras.layers.Layer:
        """The ``SpectrogramImage`` layer (waveform -> normalised image)."""
        return self.get_layer(SPECTROGRAM_LAYER)

    @property
    def classifier(self) -> keras.Model:
        """The image classifier (backbone + head): normalised image -> class probabilities."""
        return self.get_layer(CLASSIFIER_LAYER)

    @property
    def backbone(self) -> keras.Model:
        return self.classifier.get_layer(BACKBONE_LAYER_NAME)

    def set_augmentation(self, augmentation: SapAugment | None, seed: int = 0) -> None:
        """Attach (or with None remove) the training-time augmentation policy.

        Augmented step k (counted over every ``fit`` since the seed was set) draws its randomness from the
        stateless seed ``[seed, k]``: a later phase or epoch with the same seed continues the stream instead of
        repeating it, a new seed starts a new one at k = 0, and the same seed on a fresh model reproduces it.
        Only a different policy re-traces ``fit``; a new seed does not.
        """
        if augmentation is not None and int(seed) != int(self._augmentation_seed.numpy()):
            self._augmentation_steps.assign(0)
        if augmentation is not None:
            self._augmentation_seed.assign(int(seed))
        if augmentation != self._augmentation:
            self.train_function = None
        self._augmentation = augmentation

    @property
    def augmentation(self) -> SapAugment | None:
        """The attached training-time augmentation policy (None: off)."""
        return self._augmentation

    def restart_augmentation(self) -> None:
        """Start the augmentation stream at step 0 again, as on a freshly built model (same seed included)."""
        self._augmentation_steps.assign(0)

    @property
    def augmentation_steps(self) -> int:
        """Augmented training steps taken with the current augmentation seed (`set_augmentation`)."""
        return int(self._augmentation_steps.numpy())

    def augment(self, images: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """SapAugment one batch of normalised images, as `train_step` does (advances the random stream).

        The loss ranking comes from an inference-mode (no dropout) pass over the clean batch, as in the authors'
        implementation: dropout noise must not decide which samples count as easy.
        """
        losses = keras.losses.categorical_crossentropy(y, self.classifier(images, training=False))
        step = self._augmentation_steps.assign_add(1) - 1
        seed = tf.stack([tf.convert_to_tensor(self._augmentation_seed), step])
        images, y, _ = self._augmentation(images, y, losses, seed)
        return images, y

    def train_step(self, data: Any) -> dict[str, Any]:
        """One step; with an augmentation policy the gradient is taken on the SapAugmented batch.

        Augmentation costs one inference-mode forward pass over the batch (the loss ranking, see `augment`) on
        top of the plain step.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        images = self.spectrogram(x)
        if self._augmentation is not None:
            images, y = self.augment(images, y)
        with tf.GradientTape() as tape:
            y_pred = self.classifier(images, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss, sample_weight=tf.shape(y_pred)[0])
            scaled_loss = self.optimizer.scale_loss(loss)
        trainable = self.trainable_weights
        if trainable:
            gradients = tape.gradient(scaled_loss, trainable)
            self.optimizer.apply_gradients(zip(gradients, trainable))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def build_model(cfg: Config, num_classes: int) -> DslModel:
    """Build the full model (raw waveform chunks -> class probabilities) from a config.

    Seeds Keras from ``cfg.training.seed`` first, so every process building the same config gets the same
    initial weights.

    Args:
        cfg: Validated config; uses ``data``, ``spectrogram``, ``model`` and ``training.seed``.
        num_classes: Number of output classes (>= 2).

    Returns:
        An uncompiled `DslModel` named ``"dsl_fed"``, input ``(B, cfg.data.chunk_samples)``, output ``(B, C)``.
    """
    if num_classes < 2:
        raise DslFedError(f"need at least 2 classes to train a classifier, got {num_classes}")
    waveform, images, backbone = _front_end(cfg)
    image = keras.Input(backbone.input_shape[1:], name="image")
    x = keras.layers.Dense(cfg.model.units, name="hidden")(backbone(image))
    x = ARELU(cfg.model.arelu_alpha, cfg.model.arelu_beta, name="arelu")(x)
    x = keras.layers.Dropout(cfg.model.dropout, name="dropout")(x)
    probabilities = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    classifier = keras.Model(image, probabilities, name=CLASSIFIER_LAYER)
    model = DslModel(waveform, classifier(images), name="dsl_fed")
    set_phase(model, 1)
    return model


def build_embedder(cfg: Config) -> keras.Model:
    """Waveform chunks -> the backbone's pooled features ``(B, F)``: the DeepSpectrum embedding (`dsl_fed.baseline`).

    The same `SpectrogramImage` and backbone (weights, seed) as `build_model`, without the head.
    """
    waveform, images, backbone = _front_end(cfg)
    return keras.Model(waveform, backbone(images), name="embedder")


def _front_end(cfg: Config) -> tuple[Any, Any, keras.Model]:
    """Seed Keras, then ``(waveform input, spectrogram images, backbone)`` of the configured model."""
    keras.utils.set_random_seed(cfg.training.seed)
    spec = get_spec(cfg.model.backbone)
    backbone = create_backbone(cfg.model.backbone, cfg.model.weights, cfg.spectrogram.image_size)
    waveform = keras.Input((cfg.data.chunk_samples,), name="waveform")
    images = spectrogram_layer(cfg.spectrogram, cfg.data.sample_rate, spec.preprocess)(waveform)
    return waveform, images, backbone


def set_phase(model: keras.Model, phase: int, unfrozen: int | Literal["all"] = 0) -> None:
    """Freeze the model for a training phase.

    Phase 1 trains the head only (whole backbone frozen). Phase 2 additionally unfreezes the top `unfrozen`
    layers of the backbone (counted in ``backbone.layers`` order, input layer included, like the paper's
    298 of DenseNet121's 428); 0 = head only, ``"all"`` = the whole backbone. The spectrogram layer is
    never trainable. Recompile after changing the phase.

    Raises:
        DslFedError: unknown phase, or `unfrozen` larger than the backbone.
    """
    model.get_layer(SPECTROGRAM_LAYER).trainable = False
    classifier = model.get_layer(CLASSIFIER_LAYER)
    classifier.trainable = True
    backbone = classifier.get_layer(BACKBONE_LAYER_NAME)
    if phase == 1:
        backbone.trainable = False
        return
    if phase != 2:
        raise DslFedError(f"training phase must be 1 or 2, got {phase!r}")
    layers = backbone.layers
    if unfrozen == "all":
        count = len(layers)
    elif isinstance(unfrozen, int) and not isinstance(unfrozen, bool) and 0 <= unfrozen <= len(layers):
        count = unfrozen
    else:
        raise DslFedError(
            f"training.unfrozen_layers: must be 'all' or an integer in [0, {len(layers)}] "
            f"(the backbone has {len(layers)} layers), got {unfrozen!r}"
        )
    backbone.trainable = count > 0
    first = len(layers) - count
    for i, layer in enumerate(layers):
        layer.trainable = i >= first


def trainable_weight_names(model: keras.Model) -> list[str]:
    """Names (``variable.path``) of the weights trained in the current phase, in a deterministic order.

    This is exactly the slice a federated client sends and the server aggregates.
    """
    return _unique_paths(model.trainable_weights)


def weight_names(model: keras.Model) -> list[str]:
    """Names of all weights (trainable and frozen), e.g. for sending the full initial model once."""
    return _unique_paths(model.weights)


def get_weights_by_name(model: keras.Model, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Copy weights out of `model` as ``{name: array}``; ``names=None`` = the current trainable slice."""
    variables = _variables_by_path(model)
    names = trainable_weight_names(model) if names is None else list(names)
    out = {}
    for name in names:
        if name not in variables:
            raise DslFedError(f"unknown weight name {name!r} for model {model.name!r}")
        out[name] = np.array(variables[name].numpy())
    return out


def set_weights_by_name(model: keras.Model, weights: dict[str, Any]) -> None:
    """Assign ``{name: array}`` into `model` (any subset of its weights; values cast to the variable's dtype).

    Raises:
        DslFedError: an unknown name or a shape mismatch (checked for all entries before anything is assigned).
    """
    variables = _variables_by_path(model)
    arrays = {}
    for name, value in weights.items():
        if name not in variables:
            raise DslFedError(f"unknown weight name {name!r} for model {model.name!r}")
        array = np.asarray(value)
        expected = tuple(variables[name].shape)
        if array.shape != expected:
            raise DslFedError(f"weight {name!r}: expected shape {expected}, got {array.shape}")
        arrays[name] = array
    for name, array in arrays.items():
        variables[name].assign(array.astype(variables[name].dtype))


def load_model(path: str | Path) -> keras.Model:
    """Load a dsl_fed ``.keras`` model (custom layers registered), with a one-line error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise DslFedError(f"{path}: model file not found")
    if path.suffix != ".keras":
        raise DslFedError(f"{path}: expected a Keras model file (.keras)")
    if not zipfile.is_zipfile(path):  # Keras would report "File not found" for a damaged archive
        raise DslFedError(f"{path}: damaged or not a Keras model (a .keras file is a zip archive)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad archive
        first = first_line(exc)
        raise DslFedError(f"{path}: cannot load Keras model ({first[:200]})") from None


def _unique_paths(variables: list) -> list[str]:
    names = [v.path for v in variables]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"weight names are not unique: {duplicates[:5]}")
    return names


def _variables_by_path(model: keras.Model) -> dict[str, Any]:
    return dict(zip(_unique_paths(model.weights), model.weights))
