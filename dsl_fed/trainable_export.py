"""Trainable TFLite export: one file with which a phone embeds its audio and trains the paper's head, LiteRT only.

TensorFlow's on-device-training pattern (a `tf.Module` whose signatures become the model's signatures) with
the frozen-base + head split of its personalisation example. Signatures:

- ``embed(audio [B, samples]) -> bottleneck [B, D]``: spectrogram layer + frozen backbone (inference mode);
- ``train(bottleneck [B, D], label [B] int32, class_weight [C], dropout_draws [B, H]) -> loss``: one optimizer
  step on the head. ``class_weight`` is the per-class loss weight (Keras' ``class_weight``; all ones =
  unweighted), an input because a client computes it from its own labels (`dsl_fed.class_balance.class_weights`),
  as a Keras client does every round. ``dropout_draws`` are uniform draws in [0, 1), one per example and hidden
  unit: a unit is kept where its draw is at least the dropout rate (ignored at rate 0);
- ``infer(bottleneck [B, D]) -> probabilities [B, C]``;
- ``parameters() -> {weight key: value}`` and ``restore({weight key: value}) -> ok``: the head's weights in memory.
  ``restore`` also resets the optimizer (step 0, zero slots), as `dsl_fed.train.compile_for_phase` does before a
  Keras client's local training.

The head is Dense -> ARELU -> Dropout -> Dense(softmax) with categorical cross-entropy. Its backward pass is
written out here with ops that have TFLite builtin kernels (matmul, transpose, select, sum, ...), and so are the
three configured optimizers (Keras' update rules, Keras' defaults), so no Flex op is needed and
`ai-edge-litert` alone can train. ARELU's alpha and beta train too (alpha through its clip, as the Keras layer).
Dropout's randomness comes in as ``dropout_draws`` so that the caller's seed decides the masks: LiteRT's random
kernels (RANDOM_UNIFORM, ...) take their seeds as attributes fixed at conversion and restart their sequence with
every interpreter, and it has no stateless random op, so every node would draw the same masks.

Everything is converted from one SavedModel with resource variables; ``manifest.json`` beside the model lists
the signatures, tensor names and shapes, weight keys (with their Keras weight paths), classes and optimizer.
`dsl_fed.litert_training.TrainableRunner` runs the file without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.config import Config
from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write

__all__ = ["TRAINABLE_KIND", "SIGNATURES", "head_parts", "build_trainable_module", "convert_trainable",
           "export_trainable", "weight_key"]

TRAINABLE_KIND = "trainable"
SIGNATURES = ("embed", "train", "infer", "parameters", "restore")
MANIFEST_VERSION = 2  # 2: train takes dropout_draws
PARITY_LIMIT = 1e-4  # |p_litert - p_keras| of the exported infer(embed(x)); float32 rounding only
PARITY_CHUNKS = 4

# Keras' defaults for the optimizers `dsl_fed.train.make_optimizer` builds (SGD with its momentum 0.9).
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7
ADADELTA_RHO, ADADELTA_EPSILON = 0.95, 1e-7
SGD_MOMENTUM = 0.9
SLOTS = {"adam": ("m", "v"), "adadelta": ("accumulated_grad", "accumulated_delta"), "sgd": ("momentum",)}
ALPHA_MIN, ALPHA_MAX = 0.01, 0.99  # dsl_fed.arelu's clip of the negative slope


def weight_key(path: str) -> str:
    """Signature-safe key of a Keras weight path (``hidden/kernel`` -> ``hidden_kernel``)."""
    return re.sub(r"\W", "_", path)


def head_parts(model: Any) -> tuple[Any, dict[str, Any]]:
    """``(embedder, head)`` of a `build_model` model: waveform -> backbone features, and the head's layers.

    Raises:
        DslFedError: the model cannot be split into a frozen base and the paper's head
            (Dense -> ARELU -> Dropout -> Dense with softmax right after the backbone).
    """
    import keras

    from dsl_fed.arelu import ARELU
    from dsl_fed.backbones import BACKBONE_LAYER_NAME
    from dsl_fed.bottleneck import embedder_model
    from dsl_fed.export import split_model

    _, classifier = split_model(model)
    names = [layer.name for layer in getattr(classifier, "layers", [])]
    if BACKBONE_LAYER_NAME not in names:
        raise DslFedError(f"model {model.name!r}: its classifier has no layer {BACKBONE_LAYER_NAME!r}, so it cannot be "
                          "split into a frozen base and a head")
    layers = classifier.layers[names.index(BACKBONE_LAYER_NAME) + 1:]
    kinds = (keras.layers.Dense, ARELU, keras.layers.Dropout, keras.layers.Dense)
    shape_ok = len(layers) == 4 and all(isinstance(layer, kind) for layer, kind in zip(layers, kinds))
    if not shape_ok or layers[0].activation is not keras.activations.linear or not layers[0].use_bias \
            or not layers[3].use_bias or getattr(layers[3].activation, "__name__", "") != "softmax":
        found = " -> ".join(type(layer).__name__ for layer in layers) or "nothing"
        raise DslFedError(f"model {model.name!r}: the head after the backbone is {found}, not the paper's "
                          "Dense -> ARELU -> Dropout -> Dense(softmax); a trainable export needs that head")
    hidden, arelu, dropout, predictions = layers
    return embedder_model(model), {"hidden": hidden, "arelu": arelu, "dropout": dropout, "predictions": predictions}


def _head_weights(head: dict[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """``{role: (keras path, value)}`` in a fixed order: the slice a federated client exchanges in phase 1."""
    variables = {
        "kernel1": head["hidden"].kernel, "bias1": head["hidden"].bias,
        "alpha": head["arelu"].alpha, "beta": head["arelu"].beta,
        "kernel2": head["predictions"].kernel, "bias2": head["predictions"].bias,
    }
    return {role: (v.path, np.array(v.numpy(), dtype=np.float32)) for role, v in variables.items()}


def build_trainable_module(model: Any, cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The `tf.Module` with the five signatures, and the facts the manifest records about it."""
    import tensorflow as tf

    embedder, head = head_parts(model)
    weights = _head_weights(head)
    optimizer = cfg.training.optimizer
    if optimizer not in SLOTS:
        raise DslFedError(f"training.optimizer: no on-device update for {optimizer!r} (choose from {', '.join(SLOTS)})")
    dropout_rate = float(head["dropout"].rate)
    samples = int(model.input_shape[-1])
    dim, units = (int(n) for n in weights["kernel1"][1].shape)
    classes = int(weights["kernel2"][1].shape[1])
    keys = {role: weight_key(path) for role, (path, _) in weights.items()}
    if len(set(keys.values())) != len(keys):
        raise DslFedError(f"model {model.name!r}: head weight names {sorted(keys.values())} are not unique")

    frozen_embed = _frozen(embedder, samples)

    class TrainableHead(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="trainable_head")
            self.frozen_embed = frozen_embed
            self.w = {role: tf.Variable(value, name=keys[role]) for role, (_, value) in weights.items()}
            self.slots = {role: [tf.Variable(tf.zeros_like(value), name=f"{keys[role]}_{slot}")
                                 for slot in SLOTS[optimizer]] for role, (_, value) in weights.items()}
            self.step = tf.Variable(0.0, name="optimizer_step")
            self.learning_rate = tf.Variable(float(cfg.training.learning_rate), name="learning_rate")

        def _forward(self, x: Any, dropout_draws: Any = None) -> tuple[Any, ...]:
            w = self.w
            h = tf.matmul(x, w["kernel1"]) + w["bias1"]
            positive = 1.0 + tf.sigmoid(w["beta"])
            negative = tf.clip_by_value(w["alpha"], ALPHA_MIN, ALPHA_MAX)
            relu, low = tf.nn.relu(h), tf.minimum(h, 0.0)
            a = positive * relu + negative * low
            scale = None
            if dropout_draws is not None and dropout_rate > 0:
                keep = tf.cast(dropout_draws >= dropout_rate, tf.float32)
                scale = keep / (1.0 - dropout_rate)
                a = a * scale
            logits = tf.matmul(a, w["kernel2"]) + w["bias2"]
            return h, relu, low, positive, negative, a, scale, logits

        @tf.function(input_signature=[tf.TensorSpec([None, samples], tf.float32, name="audio")])
        def embed(self, audio: Any) -> dict[str, Any]:
            return {"bottleneck": self.frozen_embed(audio)[0]}

        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name="bottleneck")])
        def infer(self, bottleneck: Any) -> dict[str, Any]:
            return {"probabilities": tf.nn.softmax(self._forward(bottleneck)[-1])}

        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name="bottleneck"),
                                      tf.TensorSpec([None], tf.int32, name="label"),
                                      tf.TensorSpec([classes], tf.float32, name="class_weight"),
                                      tf.TensorSpec([None, units], tf.float32, name="dropout_draws")])
        def train(self, bottleneck: Any, label: Any, class_weight: Any, dropout_draws: Any) -> dict[str, Any]:
            w = self.w
            h, relu, low, positive, negative, a, scale, logits = self._forward(bottleneck, dropout_draws)
            onehot = tf.one_hot(label, classes, dtype=tf.float32)
            sample_weight = tf.gather(class_weight, label)
            batch = tf.cast(tf.shape(bottleneck)[0], tf.float32)
            log_p = tf.nn.log_softmax(logits)
            loss = tf.reduce_sum(sample_weight * -tf.reduce_sum(onehot * log_p, axis=1)) / batch
            # Backward pass by hand: softmax cross-entropy, Dense, dropout, ARELU, Dense.
            d_logits = (tf.exp(log_p) - onehot) * (sample_weight / batch)[:, None]
            grads = {"kernel2": tf.matmul(tf.transpose(a), d_logits), "bias2": tf.reduce_sum(d_logits, axis=0)}
            d_a = tf.matmul(d_logits, tf.transpose(w["kernel2"]))
            if scale is not None:
                d_a = d_a * scale
            sig = tf.sigmoid(w["beta"])
            grads["beta"] = tf.reduce_sum(d_a * relu) * sig * (1.0 - sig)
            inside = tf.cast((w["alpha"] >= ALPHA_MIN) & (w["alpha"] <= ALPHA_MAX), tf.float32)  # tf.clip's gradient
            grads["alpha"] = tf.reduce_sum(d_a * low) * inside
            d_h = d_a * tf.where(h > 0.0, positive, negative)
            grads["kernel1"] = tf.matmul(tf.transpose(bottleneck), d_h)
            grads["bias1"] = tf.reduce_sum(d_h, axis=0)
            self._apply(grads)
            return {"loss": loss}

        def _apply(self, grads: dict[str, Any]) -> None:
            """One step of the configured optimizer, with Keras' update rule for it."""
            step = self.step.assign_add(1.0)
            lr = self.learning_rate
            for role, g in grads.items():
                var, slots = self.w[role], self.slots[role]
                if optimizer == "adam":
                    m, v = slots
                    alpha = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, step)) / (1.0 - tf.pow(ADAM_BETA_1, step))
                    m_new = m.assign_add((g - m) * (1.0 - ADAM_BETA_1))
                    v_new = v.assign_add((tf.square(g) - v) * (1.0 - ADAM_BETA_2))
                    var.assign_sub(m_new * alpha / (tf.sqrt(v_new) + ADAM_EPSILON))
                elif optimizer == "adadelta":
                    acc_g, acc_d = slots
                    acc_g_new = acc_g.assign(ADADELTA_RHO * acc_g + (1.0 - ADADELTA_RHO) * tf.square(g))
                    delta = -(tf.sqrt(acc_d + ADADELTA_EPSILON) * g) / tf.sqrt(acc_g_new + ADADELTA_EPSILON)
                    acc_d.assign(ADADELTA_RHO * acc_d + (1.0 - ADADELTA_RHO) * tf.square(delta))
                    var.assign_add(lr * delta)
                else:
                    (m,) = slots
                    var.assign_add(m.assign(m * SGD_MOMENTUM - g * lr))

        @tf.function(input_signature=[])
        def parameters(self) -> dict[str, Any]:
            return {keys[role]: tf.identity(var) for role, var in self.w.items()}

        @tf.function(input_signature=[{keys[role]: tf.TensorSpec(value.shape, tf.float32, name=keys[role])
                                       for role, (_, value) in weights.items()}])
        def restore(self, values: dict[str, Any]) -> dict[str, Any]:
            for role, var in self.w.items():
                var.assign(values[keys[role]])
                for slot in self.slots[role]:
                    slot.assign(tf.zeros_like(slot))
            self.step.assign(0.0)
            return {"ok": tf.constant(1, tf.int32)}

    module = TrainableHead()
    facts = {
        "samples": samples, "bottleneck_dim": dim, "num_classes": classes, "dropout": dropout_rate,
        "optimizer": {"name": optimizer, "learning_rate": float(cfg.training.learning_rate),
                      "slots": list(SLOTS[optimizer]), "rule": "Keras' update rule and default hyper-parameters"
                      + (f", momentum {SGD_MOMENTUM}" if optimizer == "sgd" else "")},
        "weights": {keys[role]: {"path": path, "shape": list(value.shape)} for role, (path, value) in weights.items()},
    }
    return module, facts


def _frozen(embedder: Any, samples: int) -> Any:
    """The embedder as a graph function with its weights as constants.

    Left as resource variables, the backbone's weights are never initialised in the converted ``embed`` signature
    (LiteRT 2.3: READ_VARIABLE fails without the XNNPACK delegate and reads garbage with it); constants also let
    the converter fold them like an ordinary inference export.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    traced = tf.function(lambda audio: embedder(audio, training=False))
    return convert_variables_to_constants_v2(traced.get_concrete_function(tf.TensorSpec([None, samples], tf.float32)))


def convert_trainable(module: Any) -> bytes:
    """SavedModel of `module` with the five signatures -> builtins-only TFLite bytes with resource variables."""
    import tensorflow as tf

    from dsl_fed.export import conversion_error
    from dsl_fed.litert import flex_operators

    with tempfile.TemporaryDirectory(prefix="dsl_fed_trainable_") as saved_model:
        signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
        tf.saved_model.save(module, saved_model, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            content = converter.convert()
        except Exception as exc:
            raise conversion_error("trainable TFLite", exc) from None
    flex = flex_operators(content)
    if flex:  # the converter should have refused already; never ship a file the stock runtime cannot run
        raise DslFedError(f"trainable export needs non-builtin ops {', '.join(flex)}")
    return content


def export_trainable(model: Any, path: str | Path, *, classes: list[str] | tuple[str, ...], cfg: Config,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write the trainable ``.tflite`` and its ``manifest.json`` (same folder), after checking it with LiteRT.

    The check runs ``infer(embed(x))`` in LiteRT on a few synthetic chunks and compares it with the Keras model
    (at most `PARITY_LIMIT` per probability). Nothing is written if conversion or the check fails.

    Raises:
        DslFedError: a model without the paper's head, an optimizer with no on-device rule, class names that do not
            match the outputs, a target that is not ours to overwrite, a failed conversion or check.
    """
    from dsl_fed import __version__
    from dsl_fed.export import MANIFEST_NAME, check_export_target, split_model, synthetic_chunks
    from dsl_fed.litert import model_operators
    from dsl_fed.litert_training import TrainableRunner

    path = Path(path)
    check_export_target(path)
    classes = tuple(str(c) for c in classes)
    module, facts = build_trainable_module(model, cfg)
    spectrogram, _ = split_model(model)
    if len(classes) != facts["num_classes"]:
        raise DslFedError(f"{len(classes)} class names given for a model with {facts['num_classes']} outputs")
    content = convert_trainable(module)

    signature_io = {}
    with tempfile.TemporaryDirectory(prefix="dsl_fed_trainable_check_") as tmp:
        candidate = Path(tmp) / path.name
        candidate.write_bytes(content)
        runner = TrainableRunner(candidate)
        chunks = synthetic_chunks(PARITY_CHUNKS, facts["samples"], cfg.data.sample_rate)
        got = runner.infer(runner.embed(chunks))
        expected = np.asarray(model(chunks, training=False))
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= PARITY_LIMIT:
            raise DslFedError(f"trainable export: infer(embed(x)) differs from the Keras model by {diff:.3g} "
                              f"(allowed {PARITY_LIMIT:g}); nothing written")
        signature_io = runner.signature_io()

    manifest = {
        "kind": TRAINABLE_KIND,
        "model_file": path.name,
        "classes": list(classes),
        "signatures": signature_io,
        "weights": facts["weights"],
        "optimizer": facts["optimizer"],
        "loss": "categorical cross-entropy, mean over the batch of class_weight[label] * -log p[label] (Keras' "
                "class_weight); class_weight all ones = unweighted",
        "class_balance": cfg.training.class_balance,
        "dropout": facts["dropout"],
        "restore_resets_optimizer": True,
        "embed": "float32, spectrogram layer + frozen backbone in inference mode, same file",
        "flex_ops": [],
        "operators": model_operators(content),
        "sample_rate": cfg.data.sample_rate,
        "window_seconds": cfg.data.chunk_seconds,
        "hop_seconds": cfg.data.hop_seconds,
        "input_shape": [facts["samples"]],
        "bottleneck_dim": facts["bottleneck_dim"],
        "batch_size": cfg.training.batch_size,  # what `dsl_fed personalize` trains with
        "image_size": int(spectrogram.image_size),  # the front end's, for a personalised inference manifest
        "preprocess": str(spectrogram.preprocess),
        "parity": {"max_abs_diff": diff, "limit": PARITY_LIMIT, "source": f"{PARITY_CHUNKS} synthetic chunks"},
        "sha256": hashlib.sha256(content).hexdigest(),
        "config_hash": cfg.hash(),
        "dsl_fed_version": __version__,
        "extra": dict(extra or {}),
        "format_version": MANIFEST_VERSION,
    }
    atomic_write(path, content)
    atomic_write(path.parent / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return path
