"""Phase 1 on backbone embeddings: the frozen front end runs once per chunk instead of once per chunk and epoch.

In phase 1 the backbone is frozen and runs in inference mode, so a chunk's embedding (spectrogram layer, then
backbone) is a pure function of the front end's weights and the chunk. `head_model` is a Keras model made of the
classifier's own head layers (the same layer objects, hence the same variables and dropout seed generator):
training it on the embeddings trains the full model's head in place. With the same optimizer, class weights,
batch order (`make_dataset` with the same seed) and dropout stream, it takes the same steps as the full model;
the only difference is float rounding of the backbone's output at another batch size (tests bound it).

Not valid - and then not used (`bottleneck_applies`, with a one-line reason) - when image-space augmentation runs
(SapAugment changes the images every step) or the backbone holds a random layer (e.g. EfficientNet's stochastic
depth: its output in training mode is not a function of the chunk).
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
import numpy as np

from dsl_fed.backbones import BACKBONE_LAYER_NAME
from dsl_fed.config import Config
from dsl_fed.data.pipeline import ChunkSet
from dsl_fed.embedding_cache import EmbeddingCache, front_end_key
from dsl_fed.predict import predict_batches, predict_clips

_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (embedder, head): built and traced once


def bottleneck_applies(model: keras.Model, cfg: Config, phase: int) -> tuple[bool, str]:
    """Whether this training may run on embeddings, and if not (in phase 1 with the cache on) why not."""
    if phase != 1 or not cfg.training.embedding_cache:
        return False, ""
    if not all(hasattr(model, attr) for attr in ("spectrogram", "classifier")):
        return False, "the model is not a dsl_fed model"
    if cfg.augment.enabled:
        return False, "augmentation (CutMix/SpecAugment) changes the images in phase 1"
    if any(v.path.endswith("seed_generator_state") for v in model.backbone.variables):
        return False, f"backbone {cfg.model.backbone!r} has random layers (its training output is not fixed)"
    return True, ""


def embed(model: keras.Model, chunks: ChunkSet, batch_size: int, cache: EmbeddingCache | None,
          front_end: str | None = None) -> ChunkSet:
    """`chunks` with each waveform replaced by its backbone embedding (from `cache` if it holds them)."""
    embedder = embedder_model(model)

    def compute() -> np.ndarray:
        return predict_batches(embedder, chunks.waveforms, batch_size)

    if cache is None:
        vectors = compute()
    else:
        vectors = cache.get(front_end or front_end_key(model), chunks.waveforms, compute)
    return dataclasses.replace(chunks, waveforms=np.asarray(vectors, dtype=np.float32))


def predict_clips_on_embeddings(model: keras.Model, chunks: ChunkSet, cfg: Config, phase: int,
                                cache: EmbeddingCache | None) -> tuple | None:
    """`dsl_fed.predict.predict_clips` through the head on (cached) embeddings; None where that is not valid."""
    if not bottleneck_applies(model, cfg, phase)[0]:
        return None
    return predict_clips(head_model(model), embed(model, chunks, cfg.training.batch_size, cache),
                         batch_size=cfg.training.batch_size)


def embedder_model(model: keras.Model) -> keras.Model:
    """Waveform -> backbone embedding: the spectrogram layer and the backbone in inference mode (shared weights)."""
    return _parts(model)[0]


def head_model(model: keras.Model) -> keras.Model:
    """Embedding -> class probabilities through the classifier's own head layers (shared weights)."""
    return _parts(model)[1]


def _parts(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    if model not in _PARTS:
        classifier = model.classifier
        waveform = keras.Input(model.input_shape[1:], name="waveform")
        features = model.backbone(model.spectrogram(waveform), training=False)
        embedder = keras.Model(waveform, features, name="embedder")
        layers = classifier.layers
        start = [layer.name for layer in layers].index(BACKBONE_LAYER_NAME) + 1
        embedding = keras.Input(features.shape[1:], name="embedding")
        x = embedding
        for layer in layers[start:]:  # the head is a chain: hidden -> arelu -> dropout -> predictions
            x = layer(x)
        _PARTS[model] = (embedder, keras.Model(embedding, x, name="head"))
    return _PARTS[model]


__all__ = ["bottleneck_applies", "embed", "embedder_model", "head_model", "predict_clips_on_embeddings"]
