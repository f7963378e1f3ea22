"""train_local and the custom train_step: equality with plain Keras fit, phases, history, checkpoints."""

import csv

import keras
import numpy as np
import pytest

from dsl_fed.config import from_dict
from dsl_fed.data.pipeline import ChunkSet, make_dataset
from dsl_fed.io import read_history
from dsl_fed.models import build_model, get_weights_by_name, set_phase
from dsl_fed.predict import average_by_clip, predict_clips
from dsl_fed.train import class_weights, make_optimizer, train_local

SAMPLES = 4000  # 0.25 s at 16 kHz


def _config(**sections):
    raw = {
        "data": {"manifest": "unused.csv", "chunk_seconds": 0.25},
        "spectrogram": {"image_size": 32, "n_mels": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 16, "dropout": 0.0},
        "training": {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 8, "unfrozen_layers": 3, "class_balance": "none"},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return from_dict(raw)


def _tones(n_clips=12, chunks_per_clip=2, seed=0) -> ChunkSet:
    """Clip k is a sine at one of three frequencies (its class), a few noisy chunks per clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / 16000
    waves, labels, clips, speakers = [], [], [], []
    for k in range(n_clips):
        label = k % 3
        for _ in range(chunks_per_clip):
            waves.append(np.sin(2 * np.pi * (500 + 1500 * label) * t) + 0.3 * rng.normal(size=SAMPLES))
            labels.append(label)
            clips.append(k)
            speakers.append(f"s{k % 2}")
    return ChunkSet(np.asarray(waves, np.float32), np.asarray(labels, np.int32), np.asarray(clips, np.int32), np.asarray(speakers))


def _fit_plain(model, chunks, cfg, epochs):
    """The reference: a plain keras.Model over the same layers, trained by Keras' own train_step."""
    plain = keras.Model(model.inputs, model.outputs)
    plain.compile(optimizer=make_optimizer(cfg.training, cfg.training.learning_rate), loss=keras.losses.CategoricalCrossentropy(),
                  jit_compile=False)
    keras.utils.set_random_seed(cfg.training.seed)
    weights = class_weights(chunks.labels, 3) if cfg.training.class_balance == "class_weight" else None
    plain.fit(make_dataset(chunks, 3, cfg.training.batch_size, shuffle=True, seed=cfg.training.seed), epochs=epochs, verbose=0,
              shuffle=False, class_weight=weights)
    return plain


@pytest.mark.parametrize("augment", [{}, {"cutmix": True, "specaugment": True, "p_min": 0.0, "p_max": 0.0}])
def test_train_step_without_augmentation_equals_plain_fit(augment):
    """Augmentation off - or on with probability 0, which still runs the ranking pass and the policy."""
    # SGD (not Adam, which is invariant to the loss scale) and class weights on unbalanced classes (5/4/4 clips)
    cfg = _config(augment=augment, training={"optimizer": "sgd", "class_balance": "class_weight"})
    chunks = _tones(n_clips=13)
    ours, reference = build_model(cfg, 3), build_model(cfg, 3)
    set_phase(reference, 1)
    train_local(ours, chunks, None, cfg, phase=1, epochs=2, verbose=0)
    _fit_plain(reference, chunks, cfg, epochs=2)
    names = list(get_weights_by_name(ours))
    assert names == ["hidden/kernel", "hidden/bias", "arelu/alpha", "arelu/beta", "predictions/kernel", "predictions/bias"]
    mine, theirs = get_weights_by_name(ours, names), get_weights_by_name(reference, names)
    for name in names:
        np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(mine["hidden/kernel"], build_model(cfg, 3).get_weights()[-6])  # training did happen


def test_augmentation_changes_the_update(tmp_path):
    cfg = _config(augment={"cutmix": True, "specaugment": True, "p_min": 1.0, "p_max": 1.0})
    chunks = _tones()
    ours, reference = build_model(cfg, 3), build_model(cfg, 3)
    result = train_local(ours, chunks, None, cfg, phase=1, epochs=1, verbose=0)
    _fit_plain(reference, chunks, cfg, epochs=1)
    diff = np.abs(get_weights_by_name(ours)["hidden/kernel"] - get_weights_by_name(reference, ["hidden/kernel"])["hidden/kernel"])
    assert diff.max() > 1e-4
    assert np.isfinite(result.loss)
    assert ours._augmentation is not None  # stays attached (no re-trace next time) but is never saved:
    ours.save(tmp_path / "m.keras")
    assert keras.saving.load_model(tmp_path / "m.keras")._augmentation is None
    before = get_weights_by_name(ours, ["tiny_conv3/kernel"])["tiny_conv3/kernel"]
    result = train_local(ours, chunks, None, cfg, phase=2, epochs=1, verbose=0)  # gradients reach the backbone
    assert np.isfinite(result.loss) and not np.array_equal(before, get_weights_by_name(ours, ["tiny_conv3/kernel"])["tiny_conv3/kernel"])


def test_phases_train_only_their_slice():
    cfg = _config(training={"phase2_lr_factor": 0.1})
    chunks = _tones()
    model = build_model(cfg, 3)
    start = {k: v.copy() for k, v in get_weights_by_name(model, [w.path for w in model.weights]).items()}

    r1 = train_local(model, chunks, None, cfg, phase=1, epochs=1, verbose=0)
    after1 = get_weights_by_name(model, list(start))
    changed = {k for k in start if not np.array_equal(start[k], after1[k])}
    assert changed == {"hidden/kernel", "hidden/bias", "arelu/alpha", "arelu/beta", "predictions/kernel", "predictions/bias"}
    assert r1.history["learning_rate"] == [pytest.approx(0.01)]

    r2 = train_local(model, chunks, None, cfg, phase=2, epochs=1, verbose=0)
    after2 = get_weights_by_name(model, list(start))
    changed = {k for k in start if not np.array_equal(after1[k], after2[k])}
    assert {"tiny_conv3/kernel", "tiny_conv3/bias"} <= changed
    assert not changed & {"tiny_conv1/kernel", "tiny_conv2/kernel", "tiny_bn2/gamma", "tiny_bn2/moving_mean", "tiny_bn2/moving_variance"}
    assert r2.history["learning_rate"] == [pytest.approx(0.001)]
    assert r2.num_examples == len(chunks) == 24 and r2.epochs == 1 and r2.val_metrics is None and r2.best_epoch is None


def test_history_checkpoint_and_best_epoch(tmp_path):
    cfg = _config()
    train, val = _tones(seed=0), _tones(n_clips=6, seed=1)
    model = build_model(cfg, 3)
    r1 = train_local(model, train, val, cfg, phase=1, epochs=3, run_dir=tmp_path, verbose=0)
    r2 = train_local(model, train, val, cfg, phase=2, epochs=2, run_dir=tmp_path, verbose=0, initial_best=r1.val_metrics["uar"])

    rows = read_history(tmp_path / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and [r["phase"] for r in rows] == [1, 1, 1, 2, 2]
    with open(tmp_path / "history.csv") as f:
        header = next(csv.reader(f))
    assert {"epoch", "phase", "loss", "accuracy", "val_loss", "val_uar", "val_accuracy", "learning_rate", "seconds"} <= set(header)

    uars = [r["val_uar"] for r in rows]
    assert r1.val_metrics["uar"] == pytest.approx(max(uars[:3]))
    assert 1 <= r1.best_epoch <= 3 and rows[r1.best_epoch - 1]["val_uar"] == r1.val_metrics["uar"]
    final = r2.val_metrics if r2.best_epoch else r1.val_metrics
    assert final["uar"] == pytest.approx(max(uars))
    # the returned model holds the selected weights, and so does the checkpoint
    _, probs, labels, _ = predict_clips(model, val)
    assert np.mean(probs.argmax(1) == labels) == pytest.approx(final["accuracy"])
    best = keras.saving.load_model(tmp_path / "checkpoints" / "best.keras")
    np.testing.assert_allclose(best.predict(val.waveforms, verbose=0), model.predict(val.waveforms, verbose=0), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob("**/.*tmp*"))  # atomic writes leave no temp files


def test_zero_epochs_still_scores_validation():
    cfg = _config()
    model = build_model(cfg, 3)
    result = train_local(model, _tones(), _tones(n_clips=6, seed=1), cfg, phase=1, epochs=0, verbose=0)
    assert result.epochs == 0 and np.isnan(result.loss) and result.best_epoch == 0
    assert 0.0 <= result.val_metrics["uar"] <= 1.0


def test_class_weights_balance_present_classes():
    assert class_weights(np.array([0, 0, 0, 1]), 3) == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 1.0}
    weights = class_weights(np.array([0, 1, 2, 2, 2, 2]), 3)
    assert sum(weights[c] * n for c, n in ((0, 1), (1, 1), (2, 4))) == pytest.approx(6)  # total weight = N


def test_mismatched_chunk_length_is_a_clear_error():
    from dsl_fed.errors import DslFedError

    model = build_model(_config(), 3)
    chunks = _tones()
    short = ChunkSet(chunks.waveforms[:, :1000], chunks.labels, chunks.clip_ids, chunks.speakers)
    with pytest.raises(DslFedError, match="chunks have 1000 samples but the model expects 4000"):
        train_local(model, short, None, _config(), phase=1, epochs=1, verbose=0)


def test_clip_probabilities_are_chunk_means():
    chunks = ChunkSet(np.zeros((4, 10), np.float32), np.array([1, 1, 0, 1], np.int32), np.array([5, 5, 2, 9], np.int32),
                      np.array(["a", "a", "b", "a"]))
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    ids, clip_probs, labels, speakers = average_by_clip(probs, chunks)
    np.testing.assert_array_equal(ids, [2, 5, 9])
    np.testing.assert_allclose(clip_probs, [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]], rtol=1e-6)
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_array_equal(speakers, ["b", "a", "a"])
