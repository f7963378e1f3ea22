"""Local training of one phase: the paper's recipe as a function of (model, data, config).

Central mode calls `train_local` twice (phase 1, then phase 2) on the train partition with devel for model
selection; every Flower client calls it once per round on its own speaker shard, without validation data.
There is no module-level state: everything comes from the arguments.

Recipe: optimizer from ``training.optimizer`` (AdaDelta in the paper), categorical cross-entropy, batch
``training.batch_size``; phase 2 uses ``learning_rate * phase2_lr_factor``. Class imbalance is handled with
class weights (``training.class_balance: class_weight``): each present class gets ``N / (K * n_c)`` (the
"balanced" heuristic), so every class contributes the same total weight to the loss - which is what UAR
rewards - without duplicating chunks (oversampling would lengthen epochs and repeat identical chunks).
SapAugment (``augment.*``) is applied inside `dsl_fed.models.DslModel.train_step`. Phase 1 trains the head on
backbone embeddings computed once (`dsl_fed.bottleneck`, kept in an `EmbeddingCache` if given) where that is valid
(``training.embedding_cache``, no augmentation); the head's steps are the full model's.

With validation chunks, every epoch predicts them, averages chunk probabilities per clip and logs the clip
UAR as ``val_uar``; the best epoch (highest ``val_uar``, ties broken by lower ``val_loss``) is kept in memory,
checkpointed atomically to ``run_dir/checkpoints/best.keras`` and restored at the end.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from dsl_fed.augment import SapAugment, spec_fill
from dsl_fed.class_balance import class_weights
from dsl_fed.bottleneck import bottleneck_applies, embed, head_model
from dsl_fed.config import Config, TrainingConfig
from dsl_fed.data.pipeline import ChunkSet, make_dataset
from dsl_fed.embedding_cache import EmbeddingCache, front_end_key
from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_path, atomic_write_csv, read_history
from dsl_fed.metrics import uar
from dsl_fed.models import DslModel, set_phase
from dsl_fed.predict import average_by_clip, predict_clips

__all__ = ["TrainResult", "train_local", "predict_clips", "class_weights", "compile_for_phase", "make_optimizer"]

HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoints/best.keras"


@dataclass
class TrainResult:
    """What one `train_local` call did.

    Attributes:
        history: Per-epoch logs (``loss``, ``accuracy``, ``learning_rate``, ``seconds`` and, with validation
            data, ``val_loss``, ``val_accuracy``, ``val_uar``).
        num_examples: Training chunks (the FedAvg weight of a client).
        loss: Training loss of the last epoch (nan if no epoch ran).
        epochs: Epochs run (less than requested after early stopping).
        val_metrics: ``{"uar", "loss", "accuracy"}`` on the validation clips for the returned weights, or None.
        best_epoch: 1-based epoch of this call whose weights were restored; 0 = none beat `initial_best`
            (weights are then those the call started with); None without validation data.
    """

    history: dict[str, list[float]]
    num_examples: int
    loss: float
    epochs: int
    val_metrics: dict[str, float] | None = None
    best_epoch: int | None = None


def train_local(
    model: keras.Model,
    train_chunks: ChunkSet,
    val_chunks: ChunkSet | None,
    cfg: Config,
    phase: int,
    epochs: int | None = None,
    run_dir: Path | None = None,
    verbose: int = 1,
    *,
    seed: int | None = None,
    initial_best: float | None = None,
    cache: EmbeddingCache | None = None,
) -> TrainResult:
    """Train one phase of the two-phase recipe on in-memory chunks.

    Args:
        model: A `dsl_fed.models.DslModel` from `build_model` (or loaded from ``.keras``); trained in place.
        train_chunks: Training chunks.
        val_chunks: Validation chunks for per-epoch clip UAR, best-epoch selection and early stopping; None
            (federated clients) = train exactly `epochs` epochs and keep the last weights.
        cfg: Config (``training``, ``augment``).
        phase: 1 = head only at ``learning_rate``; 2 = top ``unfrozen_layers`` of the backbone too, at
            ``learning_rate * phase2_lr_factor``. The model's frozen state is set here.
        epochs: Epochs to run; None = ``phase1_epochs`` / ``phase2_epochs`` from the config.
        run_dir: If given, ``history.csv`` there gets one row per epoch appended (atomically rewritten), the
            best checkpoint goes to ``checkpoints/best.keras`` and TensorBoard logs (if enabled) to
            ``tensorboard/``.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).
        seed: Seed of shuffling, dropout and augmentation; None = ``cfg.training.seed`` (a federated client
            should pass e.g. ``seed + 1000 * round + client`` so rounds differ).
        initial_best: Validation UAR the model had when the call started (e.g. phase 1's best when running
            phase 2). If no epoch beats it, the starting weights are restored. None = keep the best epoch.
        cache: Where phase 1 keeps the backbone embeddings of the chunks (None: computed for this call only).

    Early stopping (``training.early_stopping``) and the best-epoch checkpoint need validation chunks; without
    them they are off.

    Returns:
        A `TrainResult`.
    """
    tcfg = cfg.training
    if len(train_chunks) == 0:
        raise DslFedError("train_local: no training chunks")
    if train_chunks.chunk_samples != model.input_shape[-1]:
        raise DslFedError(
            f"chunks have {train_chunks.chunk_samples} samples but the model expects {model.input_shape[-1]} "
            f"(data.chunk_seconds x data.sample_rate must match the model)"
        )
    epochs = (tcfg.phase1_epochs if phase == 1 else tcfg.phase2_epochs) if epochs is None else int(epochs)
    seed = tcfg.seed if seed is None else int(seed)
    num_classes = int(model.output_shape[-1])
    keras.utils.set_random_seed(seed)

    learning_rate = compile_for_phase(model, cfg, phase, seed)
    fitted, train_set, val_set = model, train_chunks, val_chunks
    bottleneck, why_not = bottleneck_applies(model, cfg, phase)
    if bottleneck:  # the head alone, on embeddings: its layers are the model's, so the model trains in place
        front_end = front_end_key(model) if cache is not None else None
        train_set = embed(model, train_chunks, tcfg.batch_size, cache, front_end)
        val_set = None if val_chunks is None else embed(model, val_chunks, tcfg.batch_size, cache, front_end)
        fitted = head_model(model)
        _compile(fitted, tcfg, ("head",), learning_rate)
    elif why_not:
        _note_once(f"note: phase 1 runs without the embedding cache: {why_not}")

    run_dir = None if run_dir is None else Path(run_dir)
    validation = _ValidationMetrics(val_set, tcfg.batch_size) if val_set is not None else None
    checkpoint = run_dir / CHECKPOINT_FILE if run_dir else None
    best = _BestWeights(initial_best, checkpoint, saved=model) if validation else None
    callbacks: list[keras.callbacks.Callback] = [_FiniteGuard(phase), _EpochInfo(phase)]
    callbacks += [c for c in (validation, best) if c is not None]
    if run_dir is not None:
        callbacks.append(_HistoryCSV(run_dir / HISTORY_FILE))
        if tcfg.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")))
    if validation is not None and tcfg.early_stopping > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_uar", mode="max", patience=tcfg.early_stopping))

    history: dict[str, list[float]] = {}
    if epochs > 0:
        dataset = make_dataset(train_set, num_classes, tcfg.batch_size, shuffle=True, seed=seed)
        weights = class_weights(train_chunks.labels, num_classes) if tcfg.class_balance == "class_weight" else None
        fit = fitted.fit(dataset, epochs=epochs, verbose=verbose, callbacks=callbacks, class_weight=weights,
                         shuffle=False)
        history = {k: [float(v) for v in vs] for k, vs in fit.history.items()}

    val_metrics = None
    best_epoch = None
    if validation is not None:
        if best is not None and best.best_epoch > 0:
            val_metrics, best_epoch = best.best_metrics, best.best_epoch
        else:
            val_metrics, best_epoch = validation.evaluate(fitted), 0
    ran = len(history.get("loss", []))
    return TrainResult(
        history=history,
        num_examples=len(train_chunks),
        loss=history["loss"][-1] if ran else math.nan,
        epochs=ran,
        val_metrics=val_metrics,
        best_epoch=best_epoch,
    )


def compile_for_phase(model: keras.Model, cfg: Config, phase: int, seed: int = 0) -> float:
    """Freeze for `phase`, compile with the phase's learning rate and attach SapAugment if configured.

    Compiling a model again for the same phase, optimizer and loss terms only puts its optimizer back into the
    state a new one starts in (step 0, zero slots, the phase's learning rate): the model keeps its traced train
    step, so a model reused for many short trainings (a federated client process) traces it once. The SapAugment
    policy stays attached after training (it is a plain object: never saved or exported) until the next call.

    Returns:
        The learning rate used.
    """
    tcfg = cfg.training
    set_phase(model, phase, tcfg.unfrozen_layers)
    learning_rate = tcfg.learning_rate if phase == 1 else tcfg.phase2_learning_rate
    _compile(model, tcfg, (phase, tcfg.unfrozen_layers), learning_rate)
    _attach_augmentation(model, cfg, seed)
    return learning_rate


def _compile(model: keras.Model, tcfg: TrainingConfig, what: tuple, learning_rate: float) -> None:
    """Compile `model` (or, if compiled for the same `what`, optimizer and loss terms, reset its optimizer)."""
    key = (*what, tcfg.optimizer, _loss_terms(model))
    compiled = getattr(model, "_dsl_compiled", None)
    if isinstance(compiled, _Compiled) and compiled.key == key and compiled.optimizer is model.optimizer:
        compiled.reset(learning_rate)
    else:
        model.compile(
            optimizer=make_optimizer(tcfg, learning_rate),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=False,  # plain TF graph mode: what the tests and benchmarks measure (XLA never was)
        )
        model.optimizer.build(model.trainable_variables)  # now rather than in the first step: its start is recorded
        model._dsl_compiled = _Compiled(key, model.optimizer)


@functools.cache  # once per process and reason: a client process trains many times
def _note_once(line: str) -> None:
    print(line, file=sys.stderr)


class _Compiled:
    """What a model was compiled for, and its optimizer's starting values (to reset it instead of recompiling)."""

    def __init__(self, key: tuple, optimizer: keras.optimizers.Optimizer) -> None:
        self.key = key
        self.optimizer = optimizer
        # a new optimizer's variables are zero (step, slots) except a few scalars such as the learning rate
        self.start = [(v, v.numpy()) for v in optimizer.variables if np.any(v.numpy())]

    def reset(self, learning_rate: float) -> None:
        for variable in self.optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))
        for variable, value in self.start:
            variable.assign(value)
        self.optimizer.learning_rate = learning_rate


def _loss_terms(model: keras.Model) -> tuple:
    """The regularisers on trainable weights (e.g. FedProx's): the traced train step computes them as they are now."""
    return tuple((v.path, v.regularizer) for v in model.trainable_weights if v.regularizer is not None)


def make_optimizer(tcfg: TrainingConfig, learning_rate: float) -> keras.optimizers.Optimizer:
    """The configured optimizer (``adadelta`` | ``adam`` | ``sgd``) at `learning_rate`."""
    if tcfg.optimizer == "adadelta":
        return keras.optimizers.Adadelta(learning_rate=learning_rate)
    if tcfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if tcfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    raise DslFedError(f"training.optimizer: unknown optimizer {tcfg.optimizer!r}")


def _attach_augmentation(model: keras.Model, cfg: Config, seed: int) -> None:
    if not isinstance(model, DslModel):
        if cfg.augment.enabled:
            raise DslFedError("augmentation needs a dsl_fed model (build_model or a saved dsl_fed .keras file)")
        return
    if not cfg.augment.enabled:
        model.set_augmentation(None)
        return
    model.set_augmentation(SapAugment(cfg.augment, spec_fill(model.spectrogram)), seed=seed)


class _FiniteGuard(keras.callbacks.Callback):
    """Stops training with an error as soon as the loss or the weights are no longer finite.

    It runs before the checkpoint callback, so the last good checkpoint is never replaced by a broken model.
    """

    def __init__(self, phase: int) -> None:
        super().__init__()
        self.phase = phase
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self._stop(f"the loss became {loss} at batch {batch + 1}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            self._stop("the weights are no longer finite")

    def _stop(self, what: str) -> None:
        raise DslFedError(f"training diverged in phase {self.phase}, epoch {self.epoch}: {what}; lower "
                          "training.learning_rate or check the data (the last good checkpoint is kept)")


class _EpochInfo(keras.callbacks.Callback):
    """Adds ``phase``, ``learning_rate`` and wall-clock ``seconds`` to every epoch's logs."""

    def __init__(self, phase: int) -> None:
        super().__init__()
        self.phase = phase
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        logs["phase"] = self.phase
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["seconds"] = time.perf_counter() - self._start


class _ValidationMetrics(keras.callbacks.Callback):
    """Clip-level ``val_uar`` (plus chunk ``val_loss`` and clip ``val_accuracy``) from one prediction pass."""

    def __init__(self, chunks: ChunkSet, batch_size: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.batch_size = batch_size

    def evaluate(self, model: keras.Model) -> dict[str, float]:
        probs = model.predict(self.chunks.waveforms, batch_size=self.batch_size, verbose=0)
        picked = np.clip(probs[np.arange(len(probs)), self.chunks.labels], 1e-7, 1.0)
        _, clip_probs, clip_labels, _ = average_by_clip(probs, self.chunks)
        clip_pred = clip_probs.argmax(axis=1)
        return {
            "uar": uar(clip_labels, clip_pred),
            "loss": float(-np.mean(np.log(picked))),
            "accuracy": float(np.mean(clip_pred == clip_labels)),
        }

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        for key, value in self.evaluate(self.model).items():
            logs[f"val_{key}"] = value


class _BestWeights(keras.callbacks.Callback):
    """Keeps the best-on-validation weights in memory, checkpoints them atomically, restores them at the end."""

    def __init__(self, initial_best: float | None, checkpoint: Path | None, saved: keras.Model | None = None) -> None:
        super().__init__()
        self.saved = saved  # the model the checkpoint holds (the full model when only its head is fitted)
        # (uar, loss): higher UAR wins, then lower loss; an `initial_best` must be beaten strictly (its loss is unknown)
        self.best_key = (-math.inf, math.inf) if initial_best is None else (float(initial_best), -math.inf)
        self.checkpoint = checkpoint
        self.best_epoch = 0
        self.best_metrics: dict[str, float] | None = None
        self._weights: list[np.ndarray] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.best_key[0] > -math.inf:  # something to beat: keep the starting weights in case nothing does
            self._weights = [np.array(w) for w in self.model.get_weights()]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        key = (logs["val_uar"], logs["val_loss"])
        if key[0] > self.best_key[0] or (key[0] == self.best_key[0] and key[1] < self.best_key[1]):
            self.best_key = key
            self.best_epoch = epoch + 1
            self.best_metrics = {"uar": logs["val_uar"], "loss": logs["val_loss"], "accuracy": logs["val_accuracy"]}
            self._weights = [np.array(w) for w in self.model.get_weights()]
            if self.checkpoint is not None:
                with atomic_path(self.checkpoint) as tmp:
                    (self.saved if self.saved is not None else self.model).save(tmp)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._weights is not None:
            self.model.set_weights(self._weights)


class _HistoryCSV(keras.callbacks.Callback):
    """Appends one row per epoch to a CSV, rewriting the whole (small) file atomically each time.

    Rows already in the file (an earlier phase of the same run) are kept; ``epoch`` continues their count.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.rows = read_history(self.path)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row: dict[str, Any] = {"epoch": len(self.rows) + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row["phase"] = int(row.get("phase", 0))
        self.rows.append(row)
        atomic_write_csv(self.path, self.rows)
