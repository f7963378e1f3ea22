"""Registry of ImageNet CNN feature extractors, in the spirit of timm's ``create_model``.

Every entry knows the image normalisation its ImageNet weights expect (``preprocess``, applied inside
`dsl_fed.spectrogram.SpectrogramImage`), its default input size and the Keras file name of its ``notop``
weights. Every backbone is built ``include_top=False, pooling="avg"`` and named ``"backbone"``, so the rest of
the model never needs to know which one it got.

Every ``BatchNormalization`` layer of a backbone becomes a `FrozenStatsBatchNormalization`: it always normalises
with its moving statistics, so fine-tuning trains gamma/beta (the paper's recipe: tf.keras fine-tuning with
the backbone called in inference mode) but never changes the statistics, which therefore never need
federated averaging.

ImageNet weights are fetched explicitly with `keras.utils.get_file` into the Keras cache
(``$KERAS_HOME/models`` or ``~/.keras/models``) before the model is built. That way an offline machine gets a
`DslFedError` naming the exact file and folder instead of a urllib traceback, and never silently trains from
random weights.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from dsl_fed.config import BACKBONE_NAMES
from dsl_fed.errors import DslFedError, first_line

BACKBONE_LAYER_NAME = "backbone"

Builder = Callable[[tuple[int, int, int]], keras.Model]


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Attributes:
        name: Registry key (``model.backbone`` in the config).
        preprocess: ImageNet normalisation mode its weights expect: ``"torch"``, ``"tf"``, ``"caffe"`` or
            ``"none"`` (the network rescales [0, 255] itself).
        default_size: Input side its ImageNet weights were trained at.
        min_size: Smallest input side the architecture accepts.
        build: ``build(input_shape) -> keras.Model`` with random weights (``include_top=False``, avg pooling);
            `create_backbone` loads pretrained weights afterwards.
        weights_file: ``weights_file(size)`` = the Keras file name of the ``notop`` ImageNet weights; None if the
            backbone has no pretrained weights.
        weights_url: Folder URL the weights file is downloaded from.
    """

    name: str
    preprocess: str
    default_size: int
    min_size: int
    build: Builder
    weights_file: Callable[[int], str] | None = None
    weights_url: str = ""


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    preprocess: str,
    default_size: int = 224,
    min_size: int = 32,
    weights_file: Callable[[int], str] | None = None,
    weights_url: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder function to `BACKBONES` under `name`."""

    def decorate(build: Builder) -> Builder:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        if name not in BACKBONE_NAMES:  # the config validates model.backbone against that list
            raise ValueError(f"backbone {name!r}: add it to dsl_fed.config.BACKBONE_NAMES too")
        BACKBONES[name] = BackboneSpec(name, preprocess, default_size, min_size, build, weights_file, weights_url)
        return build

    return decorate


def get_spec(name: str) -> BackboneSpec:
    """Return the registry entry for `name`; a typo raises a `DslFedError` listing the known names."""
    if name in BACKBONES:
        return BACKBONES[name]
    near = difflib.get_close_matches(name, list(BACKBONES), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise DslFedError(f"model.backbone: unknown backbone {name!r}; {hint}known backbones: {', '.join(sorted(BACKBONES))}")


def create_backbone(name: str, weights: str | Path | None = "imagenet", input_size: int | None = None) -> keras.Model:
    """Build a registered backbone as a ``keras.Model`` named ``"backbone"`` with output ``(B, features)``.

    Args:
        name: A key of `BACKBONES`.
        weights: ``"imagenet"`` (downloaded once into the Keras cache), None / ``"none"`` for random
            initialisation, or the path of a weights file (``.h5`` / ``.weights.h5``) for this architecture
            without its top, e.g. a copy of the Keras ``notop`` file.
        input_size: Square input side in pixels; None = the backbone's default size.

    Raises:
        DslFedError: unknown name, input too small, weights file missing or not matching, or ImageNet weights
            that cannot be downloaded (the message says where to put the file).
    """
    spec = get_spec(name)
    size = spec.default_size if input_size is None else int(input_size)
    if size < spec.min_size:
        raise DslFedError(f"spectrogram.image_size: backbone {name!r} needs images of at least {spec.min_size} px, got {size}")
    weights_path = _resolve_weights(spec, weights, size)
    model = _prepared(spec.build((size, size, 3)))
    if weights_path is not None:
        try:
            model.load_weights(weights_path)
        except (ValueError, OSError, KeyError) as exc:
            first = first_line(exc)
            raise DslFedError(f"model.weights: {weights_path} does not fit backbone {name!r} without its top ({first})") from None
    return model


@keras.saving.register_keras_serializable(package="dsl_fed")
class FrozenStatsBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that always runs in inference mode: moving statistics in, never updated.

    Keras 3 passes a Functional model's ``training`` value on to every nested layer, so ``fit`` would
    normalise unfrozen BatchNorm layers by batch statistics and update their moving statistics. Ignoring
    ``training`` here keeps tf.keras' fine-tuning behaviour (gamma and beta train when the layer is
    trainable; the statistics stay the ImageNet ones) through public API only.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        return super().call(inputs, training=False, mask=mask)


def _prepared(model: keras.Model) -> keras.Model:
    """Clone `model` with `FrozenStatsBatchNormalization` layers and stable layer names (weights copied).

    Keras names an unnamed layer ``<class>_<counter>`` from a process-wide counter (EfficientNet's input
    ``Normalization`` becomes ``normalization_1`` in the second model of a process), and weight names are
    derived from layer names. Federated participants exchange weights by name, so such layers are renamed
    ``<model>_<class>_<k>`` (k = occurrence order).
    """
    seen: dict[str, int] = {}

    def is_auto_named_with_weights(layer: keras.Operation) -> bool:
        auto = re.fullmatch(re.escape(_snake_case(type(layer).__name__)) + r"(_\d+)?", layer.name) is not None
        return auto and isinstance(layer, keras.layers.Layer) and bool(layer.weights)  # ops (x + y) own none

    def clone_layer(layer: keras.Operation) -> keras.Operation:
        config = layer.get_config()
        if is_auto_named_with_weights(layer):
            base = _snake_case(type(layer).__name__)
            config["name"] = f"{model.name}_{base}_{seen.setdefault(base, 0)}"
            seen[base] += 1
        is_batch_norm = type(layer) is keras.layers.BatchNormalization
        return (FrozenStatsBatchNormalization if is_batch_norm else type(layer)).from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def _snake_case(name: str) -> str:
    """Keras' own class-name -> default layer-name rule."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_cache_dir() -> Path:
    """The Keras cache folder (``$KERAS_HOME`` or ``~/.keras``, like Keras itself), read at call time."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def _resolve_weights(spec: BackboneSpec, weights: str | Path | None, size: int) -> Path | None:
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(weights, str) and weights == "imagenet":
        return _imagenet_weights(spec, size)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DslFedError(f"model.weights: weights file {path} not found (use 'imagenet', null or a file path)")
    return path


def _imagenet_weights(spec: BackboneSpec, size: int) -> Path:
    if spec.weights_file is None:
        raise DslFedError(f"model.weights: backbone {spec.name!r} has no ImageNet weights; set model.weights=null")
    fname = spec.weights_file(size)
    cache = keras_cache_dir()
    target = cache / "models" / fname
    if target.is_file():
        return target
    try:
        return Path(keras.utils.get_file(fname, spec.weights_url + fname, cache_subdir="models", cache_dir=str(cache)))
    except Exception as exc:  # keras wraps every urllib failure in a bare Exception
        reason = first_line(exc)
        raise DslFedError(
            f"model.weights: cannot download the ImageNet weights of {spec.name!r} ({reason}). "
            f"Offline? Copy {fname} from {spec.weights_url + fname} to {target} (the Keras cache, "
            f"$KERAS_HOME/models), or set model.weights to the path of that file, or model.weights=null for "
            f"random initialisation"
        ) from None


# --------------------------------------------------------------------------------------------- registry

_DENSENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
_MOBILENET_V2_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
_MOBILENET_V3_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
_EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
_RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"


def _densenet_file(depth: int) -> Callable[[int], str]:
    return lambda size: f"densenet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5"


@register_backbone("densenet121", "torch", weights_file=_densenet_file(121), weights_url=_DENSENET_URL)
def _densenet121(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


@register_backbone("densenet169", "torch", weights_file=_densenet_file(169), weights_url=_DENSENET_URL)
def _densenet169(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.DenseNet169(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


@register_backbone("densenet201", "torch", weights_file=_densenet_file(201), weights_url=_DENSENET_URL)
def _densenet201(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.DenseNet201(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


def _mobilenet_v2_file(size: int) -> str:
    rows = size if size in (96, 128, 160, 192, 224) else 224  # Keras falls back to the 224 weights likewise
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


@register_backbone("mobilenet_v2", "tf", weights_file=_mobilenet_v2_file, weights_url=_MOBILENET_V2_URL)
def _mobilenet_v2(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


# MobileNetV3 is built without its internal Rescaling layer and fed "tf"-normalised images instead: the same
# numbers reach the first convolution, and the spectrogram layer does all input normalisation in one place.
@register_backbone(
    "mobilenet_v3_small", "tf", weights_file=lambda size: "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", weights_url=_MOBILENET_V3_URL
)
def _mobilenet_v3_small(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.MobileNetV3Small(
        input_shape=shape, include_top=False, weights=None, pooling="avg", include_preprocessing=False, name=BACKBONE_LAYER_NAME
    )


@register_backbone(
    "mobilenet_v3_large", "tf", weights_file=lambda size: "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", weights_url=_MOBILENET_V3_URL
)
def _mobilenet_v3_large(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.MobileNetV3Large(
        input_shape=shape, include_top=False, weights=None, pooling="avg", include_preprocessing=False, name=BACKBONE_LAYER_NAME
    )


# EfficientNet rescales and normalises [0, 255] input inside the network, hence "none".
@register_backbone("efficientnet_b0", "none", weights_file=lambda size: "efficientnetb0_notop.h5", weights_url=_EFFICIENTNET_URL)
def _efficientnet_b0(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


@register_backbone(
    "resnet50", "caffe", weights_file=lambda size: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", weights_url=_RESNET_URL
)
def _resnet50(shape: tuple[int, int, int]) -> keras.Model:
    return keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape, pooling="avg", name=BACKBONE_LAYER_NAME)


@register_backbone("tiny", "tf", default_size=32, min_size=16)
def _tiny(shape: tuple[int, int, int]) -> keras.Model:
    """A 3-convolution CNN (~6 k parameters) for tests and quick demos; no pretrained weights exist.

    It has a BatchNormalization layer so tests see the same frozen-statistics behaviour as the real backbones.
    Layers (7, counting the input): tiny_input, tiny_conv1, tiny_conv2, tiny_bn2, tiny_relu2, tiny_conv3,
    tiny_pool.
    """
    layers = keras.layers
    inputs = keras.Input(shape, name="tiny_input")
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="tiny_conv1")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="tiny_conv2")(x)
    x = layers.BatchNormalization(name="tiny_bn2")(x)
    x = layers.Activation("relu", name="tiny_relu2")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="tiny_conv3")(x)
    x = layers.GlobalAveragePooling2D(name="tiny_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE_LAYER_NAME)
