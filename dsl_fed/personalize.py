"""Personalisation on the device: fine-tune the head on one user's labelled clips with LiteRT alone.

What a phone does with the trainable export (`dsl_fed.trainable_export`): embed its clips once (``embed``),
train the head (``train``) for a few epochs of the model's batch size with the balanced class weights of its own
labels (as `dsl_fed train` and a federated client weigh the loss, when ``class_balance`` is ``class_weight``),
then keep a personalised inference model: `dsl_fed.head_inference` puts the trained head behind the same frozen
front end, raw audio in as `dsl_fed export` writes it. Nothing here imports TensorFlow or Keras.

Used by ``dsl_fed personalize`` (one user's clips -> a personalised ``.tflite`` + ``manifest.json``) and by
``dsl_fed evaluate --personalize K`` (`dsl_fed.personal_eval`: every held-out speaker fine-tunes on K clips).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.errors import DslFedError

__all__ = ["DEFAULT_EPOCHS", "TrainableModel", "load_trainable", "embed_chunks", "clip_predictions", "fine_tune",
           "read_head_weights", "write_inference"]

DEFAULT_EPOCHS = 20  # a user's few clips make one or two batches an epoch
PARITY_LIMIT = 1e-4  # |p_inference - p_trainable| of the written model on the user's chunks: float32 rounding only


@dataclass(frozen=True)
class TrainableModel:
    """A trainable export on disk: its ``.tflite``, its manifest's content and the manifest's path."""

    path: Path
    manifest: dict[str, Any]
    manifest_path: Path

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.manifest["classes"]]


MANIFEST_KEYS = ("classes", "sample_rate", "window_seconds", "hop_seconds", "input_shape", "batch_size", "image_size",
                 "preprocess", "class_balance", "sha256", "config_hash", "model_file")


def load_trainable(target: str | Path) -> TrainableModel:
    """The trainable export in folder `target` (or the ``.tflite`` file in such a folder), checked.

    Raises:
        DslFedError: no such folder or file, no manifest, a manifest of an inference export (or of another file),
            a manifest from before personalisation, or a model whose sha256 differs from its manifest's.
    """
    from dsl_fed.export import MANIFEST_NAME, sha256_file

    target = Path(target)
    folder = target if target.is_dir() else target.parent
    if not target.exists():
        raise DslFedError(f"{target}: no such trainable model folder or file")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DslFedError(f"{folder}: no {MANIFEST_NAME}; give the folder `dsl_fed export MODEL.keras --trainable` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeError, ValueError) as exc:
        raise DslFedError(f"{manifest_path}: not a readable JSON manifest ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "trainable":
        raise DslFedError(f"{manifest_path}: describes an inference export, not a trainable one; personalisation needs "
                          "the folder of `dsl_fed export MODEL.keras --trainable`")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DslFedError(f"{manifest_path}: no {', '.join(missing)} (written by an older dsl_fed); export the model "
                          "again with `dsl_fed export MODEL.keras --trainable`")
    path = folder / str(manifest["model_file"])
    if target.is_file() and target.resolve() != path.resolve():
        raise DslFedError(f"{manifest_path}: describes {manifest['model_file']}, not {target.name}")
    if not path.is_file():
        raise DslFedError(f"{path}: the trainable model {manifest_path} describes is missing")
    if sha256_file(path) != manifest["sha256"]:
        raise DslFedError(f"{path}: sha256 differs from {manifest_path}; the model was changed after export")
    return TrainableModel(path, manifest, manifest_path)


def embed_chunks(runner: Any, waveforms: np.ndarray, batch_size: int) -> np.ndarray:
    """``embed`` of every chunk, in batches."""
    return np.concatenate([runner.embed(waveforms[i:i + batch_size]) for i in range(0, len(waveforms), batch_size)])


def clip_predictions(runner: Any, x: np.ndarray, chunks: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(clip labels, clip probabilities)`` of the head's current weights: chunk probabilities averaged per clip."""
    from dsl_fed.predict import average_by_clip

    probs = np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    _, clip_probs, labels, _ = average_by_clip(probs, chunks)
    return labels, clip_probs


def fine_tune(runner: Any, x: np.ndarray, labels: np.ndarray, *, batch_size: int, epochs: int, seed: int,
              class_balance: str) -> float:
    """Train the runner's head on embeddings `x` for `epochs` epochs; returns the last epoch's mean loss.

    The optimizer starts fresh (``restore`` of the current weights), batches are drawn in an order from `seed`,
    and with ``class_balance == "class_weight"`` the loss is weighted by the balanced weights of `labels`.
    """
    from dsl_fed.class_balance import class_weights
    from dsl_fed.litert_training import train_epochs

    labels = np.asarray(labels, dtype=np.int32)
    weight = None
    if class_balance == "class_weight":
        weight = np.array(list(class_weights(labels, runner.num_classes).values()), np.float32)
    runner.restore(runner.parameters())
    return train_epochs(runner, x, labels, weight, batch_size, epochs, seed)


def read_head_weights(path: str | Path, runner: Any) -> dict[str, np.ndarray]:
    """Head weights from an ``.npz`` (keys as ``parameters()`` gives them), checked against the trainable model.

    Raises:
        DslFedError: an unreadable file, a missing or unknown key, or a shape that differs from the model's.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            weights = {name: np.asarray(stored[name]) for name in stored.files}
    except (OSError, ValueError) as exc:
        raise DslFedError(f"{path}: not a readable .npz of head weights ({exc.__class__.__name__})") from None
    expected = runner.weight_shapes
    unknown = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unknown or missing:
        raise DslFedError(f"{path}: " + "; ".join(
            ([f"unknown weight(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing {', '.join(missing)}"] if missing else []))
            + f" (the model's head weights: {', '.join(sorted(expected))})")
    for name, value in weights.items():
        if value.shape != expected[name]:
            raise DslFedError(f"{path}: weight {name!r} has shape {value.shape}, the model's is {expected[name]}")
    return weights


def write_inference(model: TrainableModel, weights: dict[str, np.ndarray], out: Path, check_chunks: np.ndarray,
                    expected: np.ndarray, extra: dict[str, Any]) -> Path:
    """Write the personalised inference ``.tflite`` at `out` and its ``manifest.json``, after checking it.

    Args:
        model: The trainable export the head was trained in.
        weights: The trained head (``parameters()``).
        out: Target ``.tflite``; `dsl_fed.export.check_export_target` has accepted it.
        check_chunks: A few waveform chunks; the written model must give `expected` on them.
        expected: ``infer(embed(check_chunks))`` of the trained head.
        extra: Manifest ``extra`` (what was personalised, on what); the check's result is added as ``parity``.

    Raises:
        DslFedError: the new model's outputs differ from `expected` by more than `PARITY_LIMIT` (nothing written).
    """
    import tempfile

    from dsl_fed import __version__
    from dsl_fed.export import ExportManifest, manifest_path
    from dsl_fed.head_inference import inference_model
    from dsl_fed.io import atomic_write
    from dsl_fed.litert import TFLiteRunner

    content = inference_model(model.path.read_bytes(), weights)
    with tempfile.TemporaryDirectory(prefix="dsl_fed_personal_") as tmp:
        candidate = Path(tmp) / out.name
        candidate.write_bytes(content)
        got = TFLiteRunner(candidate).predict(check_chunks)
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= PARITY_LIMIT:
        raise DslFedError(f"personalised inference model differs from the trained head by {diff:.3g} "
                          f"(allowed {PARITY_LIMIT:g}); nothing written")
    m = model.manifest
    manifest = ExportManifest(
        model_file=out.name, classes=tuple(model.classes), input="audio",
        input_shape=tuple(int(d) for d in m["input_shape"]), sample_rate=int(m["sample_rate"]),
        window_seconds=float(m["window_seconds"]), hop_seconds=float(m["hop_seconds"]), quantization="none",
        sha256=hashlib.sha256(content).hexdigest(), config_hash=str(m["config_hash"]),
        image_size=int(m["image_size"]), preprocess=str(m["preprocess"]), dsl_fed_version=__version__,
        extra={**extra, "parity": {"max_abs_diff": diff, "limit": PARITY_LIMIT, "num_samples": int(len(check_chunks)),
                                   "source": "the personalisation clips' chunks, against the trainable model's "
                                             "infer(embed(x))"}},
    )
    atomic_write(out, content)
    atomic_write(manifest_path(out), manifest.to_json())
    return out
