"""`dsl_fed personalize`: fine-tuning a trained tiny model's head on one speaker's clips with LiteRT alone.

The trained tiny model of `deployed_tiny` (copied into a folder of this module's own) exported with
``--trainable``; the "user" is one test speaker of the demo corpus (9 clips, 3 classes).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsl_fed.cli import main

REPO = Path(__file__).resolve().parents[1]
PARITY = 1e-4  # the written model against TrainableRunner's infer(embed(x)): float32 rounding only


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(deployed_tiny, tmp_path_factory):
    """``(run_dir, trainable_dir, user_csv, user_clips)``: the trained model's trainable export and one user's clips."""
    import csv
    from types import SimpleNamespace

    run_dir = tmp_path_factory.mktemp("personal_run")
    shutil.copy(deployed_tiny.model_path, run_dir / "model.keras")
    shutil.copy(deployed_tiny.config_path, run_dir / "config.yaml")
    assert main(["export", str(run_dir / "model.keras"), "--trainable"]) == 0
    speaker = deployed_tiny.manifest.speakers("test")[0]
    clips = [c for c in deployed_tiny.manifest.partition("test") if c.speaker == speaker]
    user_csv = run_dir / "user.csv"
    with open(user_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows([str(c.path), c.label] for c in clips)
    return SimpleNamespace(run_dir=run_dir, trainable=run_dir / "tflite_trainable", csv=user_csv, clips=clips,
                           classes=deployed_tiny.classes, cfg=deployed_tiny.cfg)


def _user_chunks(trained):
    from dsl_fed.data.pipeline import load_chunks

    return load_chunks(trained.clips, trained.cfg.data, trained.classes, progress=False)


def _clip_accuracy(runner, chunks):
    from dsl_fed.personalize import clip_predictions

    x = np.concatenate([runner.embed(chunks.waveforms[i:i + 16]) for i in range(0, len(chunks), 16)])
    labels, probs = clip_predictions(runner, x, chunks, 16)
    return float(np.mean(probs.argmax(axis=1) == labels))


def test_personalize_retrains_a_scrambled_head_and_writes_an_inference_model_that_matches_it(trained, tmp_path, capsys):
    """Start from the trained head with its output classes rotated (every clip predicted wrong), fine-tune on the
    user's clips: the head changes, training-clip accuracy rises to at least the trained head's and 0.9, and the written raw-audio model
    gives the personalised head's probabilities."""
    from dsl_fed.export import read_export_manifest
    from dsl_fed.litert import TFLiteRunner
    from dsl_fed.litert_training import TrainableRunner

    runner = TrainableRunner(trained.trainable / "model.tflite")
    original = runner.parameters()
    chunks = _user_chunks(trained)
    trained_accuracy = _clip_accuracy(runner, chunks)  # measured 8 of 9 clips
    scrambled = dict(original)
    scrambled["predictions_kernel"] = np.roll(original["predictions_kernel"], 1, axis=1)
    scrambled["predictions_bias"] = np.roll(original["predictions_bias"], 1)
    start = tmp_path / "start.npz"
    np.savez(start, **scrambled)
    runner.restore(scrambled)
    before = _clip_accuracy(runner, chunks)
    assert before <= 0.5  # the rotation makes the trained model wrong on most clips

    out = tmp_path / "personal"
    code, stdout, err = run(capsys, "personalize", trained.trainable, trained.csv, "--weights", start, "--out", out,
                            "--epochs", "40")
    assert code == 0, err
    assert f"personalised on {len(trained.clips)} clip(s)" in stdout

    with np.load(out / "head.npz") as stored:
        head = {k: stored[k] for k in stored.files}
    assert sorted(head) == sorted(original)
    assert np.max(np.abs(head["predictions_kernel"] - scrambled["predictions_kernel"])) > 1e-3  # it trained
    personal = TrainableRunner(trained.trainable / "model.tflite")
    personal.restore(head)
    after = _clip_accuracy(personal, chunks)
    assert after >= max(trained_accuracy, 0.9) and after > before  # measured 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["personalized"]["training_clips"]["accuracy_after"] == pytest.approx(after, abs=1e-6)
    assert manifest["extra"]["personalized"]["training_clips"]["accuracy_before"] == pytest.approx(before, abs=1e-6)

    # The inference file: an ordinary export (manifest, raw audio in) giving the personalised head's outputs.
    export = read_export_manifest(out / "model.tflite")
    assert export.input == "audio" and export.classes == tuple(trained.classes)
    assert export.input_shape == (trained.cfg.data.chunk_samples,) and export.image_size == trained.cfg.spectrogram.image_size
    got = TFLiteRunner(out / "model.tflite").predict(chunks.waveforms)
    expected = np.concatenate([personal.infer(personal.embed(chunks.waveforms[i:i + 16]))
                               for i in range(0, len(chunks), 16)])
    assert np.max(np.abs(got - expected)) <= PARITY
    code, stdout, err = run(capsys, "predict", out / "model.tflite", trained.clips[0].path, "--format", "json")
    assert code == 0, err
    assert json.loads(stdout)["files"][0]["clip"]["prediction"] == trained.clips[0].label


def test_personalize_never_imports_tensorflow(trained, tmp_path):
    """The whole command in a fresh process: TensorFlow and Keras never enter `sys.modules`."""
    out = tmp_path / "fresh"
    script = ("import sys; from dsl_fed.cli import main; "
              f"code = main(['personalize', {str(trained.trainable)!r}, {str(trained.csv)!r}, '--epochs', '2', "
              f"'--out', {str(out)!r}]); "
              "print(code, [m for m in ('tensorflow', 'keras') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr
    assert (out / "model.tflite").is_file()


def test_labels_csv_names_the_files_of_a_folder(trained, tmp_path, capsys):
    folder = tmp_path / "recordings"
    folder.mkdir()
    labels = tmp_path / "labels.csv"
    lines = ["filename,label"]
    for i, clip in enumerate(trained.clips[:4]):
        shutil.copy(clip.path, folder / f"rec{i}.wav")
        lines.append(f"rec{i}.wav,{clip.label}")
    labels.write_text("\n".join(lines) + "\n")
    code, stdout, err = run(capsys, "personalize", trained.trainable, folder, "--labels", labels, "--epochs", "2",
                            "--out", tmp_path / "out")
    assert code == 0, err
    assert "personalised on 4 clip(s)" in stdout


def _bad_inputs(trained, tmp: Path) -> dict:
    """case -> (argv after `personalize`, text the one error line must hold)."""
    from dsl_fed.litert_training import TrainableRunner

    other = tmp / "other.csv"
    other.write_text(f"filename,label\n{trained.clips[0].path},{trained.clips[0].label}\n{trained.clips[1].path},loud\n")
    missing = tmp / "missing.csv"
    missing.write_text(f"filename,label\n{trained.clips[0].path},{trained.clips[0].label}\n{tmp / 'gone.wav'},flat\n")
    broken_wav = tmp / "broken.wav"
    broken_wav.write_bytes(b"RIFF not really a wave file")
    broken = tmp / "broken.csv"
    broken.write_text(f"filename,label\n{broken_wav},flat\n")
    folder = tmp / "rec"
    folder.mkdir()
    shutil.copy(trained.clips[0].path, folder / "a.wav")
    labels = tmp / "labels.csv"
    labels.write_text("filename,label\na.wav,whisper\n")
    params = TrainableRunner(trained.trainable / "model.tflite").parameters()
    renamed = tmp / "renamed.npz"
    np.savez(renamed, **{("hidden/kernel" if k == "hidden_kernel" else k): v for k, v in params.items()})
    reshaped = tmp / "reshaped.npz"
    np.savez(reshaped, **{**params, "predictions_bias": np.zeros(7, np.float32)})
    inference = trained.run_dir / "tflite_fp32"
    if not inference.exists():
        assert main(["export", str(trained.run_dir / "model.keras")]) == 0
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "model.tflite").write_bytes(b"someone else's file")
    old = tmp / "old_trainable"
    old.mkdir()
    shutil.copy(trained.trainable / "model.tflite", old / "model.tflite")
    manifest = json.loads((trained.trainable / "manifest.json").read_text())
    del manifest["batch_size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    csv = trained.csv
    return {
        "trainable export from before personalisation": ([old, csv], f"{old / 'manifest.json'}: no batch_size"),
        "inference export as MODEL_DIR": ([inference, csv], f"{inference / 'manifest.json'}: describes an inference export"),
        "label outside the classes": ([trained.trainable, other], f"{other} line 3: label 'loud'"),
        "label outside the classes (--labels)": ([trained.trainable, folder, "--labels", labels],
                                                 f"{labels} line 2: label 'whisper'"),
        "missing clip": ([trained.trainable, missing], f"{missing} line 3: audio file"),
        "unreadable clip": ([trained.trainable, broken], str(broken_wav)),
        "weights with a wrong name": ([trained.trainable, csv, "--weights", renamed],
                                      f"{renamed}: unknown weight(s) hidden/kernel; missing hidden_kernel"),
        "weights with a wrong shape": ([trained.trainable, csv, "--weights", reshaped],
                                       f"{reshaped}: weight 'predictions_bias' has shape (7,)"),
        "output folder holding another file": ([trained.trainable, csv, "--out", taken],
                                               f"{taken / 'model.tflite'}: exists and is not an earlier"),
        "no such model folder": ([tmp / "nowhere", csv], f"{tmp / 'nowhere'}: no such trainable model"),
    }


def test_bad_input_is_one_line_exit_2_and_nothing_written(trained, tmp_path, capsys):
    for case, (argv, message) in _bad_inputs(trained, tmp_path).items():
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        if "--out" not in argv:
            argv = [*argv, "--out", out]
        code, stdout, err = run(capsys, "personalize", *argv)
        assert code == 2, (case, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (case, err)
        assert not out.exists(), case
    assert (tmp_path / "taken" / "model.tflite").read_bytes() == b"someone else's file"


def test_a_trainable_file_where_an_inference_one_is_expected_is_one_line(trained, capsys):
    code, _, err = run(capsys, "predict", trained.trainable / "model.tflite", trained.clips[0].path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{trained.trainable / 'manifest.json'}: describes a trainable model" in err


# ------------------------------------------------------------------------------------ evaluate --personalize


def _result(speaker, before, after, n=10):
    """A speaker whose scored clips give exactly these UARs (two classes, n clips each)."""
    from dsl_fed.personal_eval import SpeakerResult

    labels = np.array([0] * n + [1] * n)

    def preds(score):  # recall `score` on class 0, 1.0 on class 1: UAR (score + 1) / 2
        right = int(round(n * (2 * score - 1)))
        return np.array([0] * right + [1] * (n - right) + [1] * n)

    return SpeakerResult(speaker, 3, labels, preds(before), preds(after))


def test_summary_means_and_worst_decile_on_a_known_case():
    from dsl_fed.personal_eval import summarize

    before = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0]
    after = [0.9, 0.6, 1.0, 0.8, 0.9, 1.0, 0.75, 0.95, 0.75, 0.85, 0.95, 1.0]
    results = [_result(f"s{i:02d}", b, a) for i, (b, a) in enumerate(zip(before, after))]
    summary = summarize(results, ["a", "b"], n_boot=200)
    assert summary["worst_count"] == 2  # ceil(10 % of 12)
    assert summary["worst"]["before"]["worst_10pct"] == pytest.approx((0.5 + 0.55) / 2)
    assert summary["worst"]["before"]["worst_speakers"] == ["s00", "s06"]
    assert summary["worst"]["after"]["worst_10pct"] == pytest.approx((0.6 + 0.75) / 2)
    assert summary["worst"]["after"]["worst_speakers"] == ["s01", "s06"]
    assert summary["mean"]["before"] == pytest.approx(np.mean(before))
    assert summary["mean"]["gain"] == pytest.approx(np.mean(after) - np.mean(before))
    for when in ("before", "after", "gain"):
        low, high = summary["mean_ci"][when]
        assert low <= summary["mean"][when] <= high
    assert summary["mean_ci"]["gain"][0] > 0  # every speaker gained or kept
    assert summary["pooled"]["before"]["ci_level"] == "speakers" and summary["pooled"]["before"]["ci_groups"] == 12


def test_pick_clips_is_stratified_and_fixed_by_the_seed(deployed_tiny):
    from dsl_fed.personal_eval import pick_clips

    speaker = deployed_tiny.manifest.speakers("test")[0]
    clips = [c for c in deployed_tiny.manifest.partition("test") if c.speaker == speaker]  # 3 per class
    tune, rest = pick_clips(clips, 3, seed=0)
    assert sorted(c.label for c in tune) == sorted(deployed_tiny.classes)  # one of each class
    assert len(rest) == len(clips) - 3 and not {c.clip_id for c in tune} & {c.clip_id for c in rest}
    assert pick_clips(list(reversed(clips)), 3, seed=0) == (tune, rest)
    assert any(pick_clips(clips, 3, seed=s)[0] != tune for s in range(1, 5))
    tune5, _ = pick_clips(clips, 5, seed=0)
    assert sorted(np.unique([c.label for c in tune5], return_counts=True)[1]) == [1, 2, 2]
    assert pick_clips(clips, len(clips), seed=0)[1] == []


def test_evaluate_personalize_reports_each_speaker_before_and_after(deployed_tiny, trained, capsys):
    """On a .keras model: "before" is the Keras model's own UAR on each speaker's scored clips, the worst decile of
    the two test speakers is the lower one, and the table is written beside the model."""
    from dsl_fed.metrics import uar
    from dsl_fed.personal_eval import pick_clips
    from dsl_fed.predict import predict_clips
    from dsl_fed.data.pipeline import load_chunks

    model = trained.run_dir / "model.keras"
    code, out, err = run(capsys, "evaluate", model, "--config", trained.run_dir / "config.yaml", "--partition", "test",
                         "--personalize", 3, "--epochs", 10)
    assert code == 0, err
    table = (trained.run_dir / "model_personalize_test_k3.md").read_text()
    assert table.strip() == out.strip()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    speakers = deployed_tiny.manifest.speakers("test")
    config = deployed_tiny.cfg
    for speaker in speakers:
        clips = [c for c in deployed_tiny.manifest.partition("test") if c.speaker == speaker]
        _, rest = pick_clips(clips, 3, seed=config.training.seed)
        chunks = load_chunks(rest, config.data, deployed_tiny.classes, progress=False)
        _, probs, labels, _ = predict_clips(deployed_tiny.model, chunks, batch_size=16)
        assert rows[speaker][:3] == ["3", "6", f"{uar(labels, probs.argmax(axis=1)):.3f}"]
    after = [float(rows[s][3]) for s in speakers]
    worst = rows["**worst 10 % (1 speaker(s))**"]
    assert float(worst[3].split()[0]) == pytest.approx(min(after), abs=1e-3)
    mean = rows["**mean over speakers**"]
    assert float(mean[3].split()[0]) == pytest.approx(np.mean(after), abs=1e-3)
    assert "K = 3" in table and "10 epochs of batch 16" in table and "chance UAR 0.333" in table


def test_evaluate_personalize_refusals_are_one_line(trained, tmp_path, capsys):
    config = trained.run_dir / "config.yaml"
    cases = [
        (["--partition", "train", "--personalize", 2], "use --partition devel or test"),
        (["--epochs", 3], "--epochs needs --personalize K"),
        (["--personalize", 2, "--json", tmp_path / "m.json"], "--json and --personalize"),
        (["--personalize", 9], "no speaker has more clips than K"),  # 9 clips per demo speaker: none left to score
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "evaluate", trained.trainable, "--config", config, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    foreign = trained.trainable / "model_personalize_devel_k2.md"
    foreign.write_text("my notes\n")
    code, _, err = run(capsys, "evaluate", trained.trainable, "--config", config, "--partition", "devel",
                       "--personalize", 2)
    assert code == 2 and f"{foreign}: exists and is not an earlier personalisation table" in err
    assert foreign.read_text() == "my notes\n"
    foreign.unlink()
