"""`dsl_fed predict` / `dsl_fed export` end to end: same decisions as `dsl_fed evaluate`, streaming counts,
output formats and one clear line for every bad input."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.cli import main
from dsl_fed.data.audio import load_audio
from dsl_fed.data.chunking import count_chunks
from dsl_fed.data.pipeline import load_chunks
from dsl_fed.metrics import uar
from dsl_fed.predict import predict_clips


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def test_clips(deployed_tiny):
    return deployed_tiny.manifest.partition("test")


def test_predict_gives_the_same_decisions_as_evaluate(deployed_tiny, test_clips, tmp_path, capsys):
    d = deployed_tiny
    folder = tmp_path / "test_audio"
    folder.mkdir()
    names = {}
    for clip in test_clips:
        target = folder / f"{clip.speaker}_{clip.path.name}"
        shutil.copy(clip.path, target)
        names[clip.clip_id] = str(target)
    code, out, _ = run(capsys, "predict", d.tflite, folder, "--format", "json")
    assert code == 0
    decided = {f["file"]: d.classes.index(f["clip"]["prediction"]) for f in json.loads(out)["files"]}
    assert len(decided) == len(test_clips) >= 12

    # Clip by clip: what evaluation computes (mean of the Keras model's chunk probabilities per clip).
    ids, probs, labels, _ = predict_clips(d.model, load_chunks(test_clips, d.cfg.data, d.classes, progress=False))
    assert [decided[names[i]] for i in ids] == probs.argmax(axis=1).tolist()

    # And the CLI's clip-level UAR equals `dsl_fed evaluate`'s.
    code, _, _ = run(capsys, "evaluate", d.model_path, "--config", d.config_path, "--partition", "test",
                     "--json", tmp_path / "eval.json")
    assert code == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert uar(labels, [decided[names[i]] for i in ids]) == pytest.approx(evaluated["uar"], abs=1e-12)


def test_chunk_rows_and_clip_decision(deployed_tiny, test_clips, capsys):
    d = deployed_tiny
    clip = test_clips[0].path
    n = len(load_audio(clip))
    code, out, _ = run(capsys, "predict", d.tflite, clip, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    chunks, summary = rows[:-1], rows[-1]
    window, hop = d.cfg.data.chunk_samples, d.cfg.data.hop_samples
    assert len(chunks) == count_chunks(n, window, hop)
    assert summary["chunk"] == "clip"
    p = np.array([[float(r[c]) for c in d.classes] for r in chunks])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    clip_p = np.array([float(summary[c]) for c in d.classes])
    np.testing.assert_allclose(clip_p, p.mean(axis=0), atol=1e-5)
    assert summary["prediction"] == d.classes[int(clip_p.argmax())]
    assert [float(r["start_s"]) for r in chunks] == [round(k * hop / 16000, 3) for k in range(len(chunks))]

    code, out, _ = run(capsys, "predict", d.tflite, clip)  # the default table
    assert code == 0 and f"decision: {summary['prediction']}" in out


def test_stream_yields_one_prediction_per_hop(deployed_tiny, test_clips, capsys):
    d = deployed_tiny
    clip = max(test_clips, key=lambda c: sf.info(str(c.path)).frames).path
    n = len(load_audio(clip))
    code, out, _ = run(capsys, "predict", d.tflite, clip, "--stream", "--block", 1000, "--format", "json")
    assert code == 0
    streamed = json.loads(out)["files"][0]["chunks"]
    window, hop = d.cfg.data.chunk_samples, d.cfg.data.hop_samples
    assert len(streamed) == (n - window) // hop + 1
    assert all(c["latency_ms"] > 0 for c in streamed)
    code, out, _ = run(capsys, "predict", d.tflite, clip, "--format", "json")
    offline = json.loads(out)["files"][0]["chunks"]
    assert len(offline) in (len(streamed), len(streamed) + 1)  # offline chunking also pads the tail
    for s, o in zip(streamed, offline):  # same windows -> same probabilities
        assert (s["start_s"], s["end_s"]) == (o["start_s"], o["end_s"])
        np.testing.assert_allclose(list(s["probabilities"].values()), list(o["probabilities"].values()), atol=1e-6)


def test_resampled_audio_is_announced_and_still_predicted(deployed_tiny, test_clips, tmp_path, capsys):
    import librosa

    d = deployed_tiny
    clip = test_clips[1].path
    audio = load_audio(clip)
    loud = tmp_path / "clip_22k.wav"
    sf.write(loud, librosa.resample(audio, orig_sr=16000, target_sr=22050), 22050)
    code, out, err = run(capsys, "predict", d.tflite, loud, "--format", "json")
    assert code == 0
    assert "clip_22k.wav is 22050 Hz; resampling to 16000 Hz" in err
    code, ref, _ = run(capsys, "predict", d.tflite, clip, "--format", "json")
    a = list(json.loads(out)["files"][0]["clip"]["probabilities"].values())
    b = list(json.loads(ref)["files"][0]["clip"]["probabilities"].values())
    np.testing.assert_allclose(a, b, atol=0.05)  # a round trip through 22.05 kHz barely changes the decision


def test_directory_skips_non_audio_and_unreadable_files(deployed_tiny, test_clips, tmp_path, capsys):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(test_clips[0].path, folder / "sub" / "good.wav")
    (folder / "notes.txt").write_text("not audio")
    (folder / "cover.png").write_bytes(b"\x89PNG")
    (folder / "broken.wav").write_bytes(b"RIFF garbage that is not a wave file")
    code, out, err = run(capsys, "predict", deployed_tiny.tflite, folder, "--format", "json")
    assert code == 0
    assert [f["file"] for f in json.loads(out)["files"]] == [str(folder / "sub" / "good.wav")]
    assert "skipping" in err and "notes.txt" in err and "cover.png" in err
    assert "predicted 1 file(s)" in err and "skipped 2 non-audio file(s), 1 unreadable audio file(s)" in err

    only_text = tmp_path / "text_only"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    code, _, err = run(capsys, "predict", deployed_tiny.tflite, only_text)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("dsl_fed predict: error:")
    assert "no audio file could be predicted (1 non-audio, 0 unreadable" in err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_audio", "audio file or folder not found"),
        ("corrupt_audio", "cannot decode audio"),
        ("no_manifest", "no manifest.json beside the model"),
        ("missing_model", "model file not found"),
        ("realtime_without_stream", "--realtime needs --stream"),
    ],
)
def test_bad_input_is_one_clear_line(deployed_tiny, test_clips, tmp_path, capsys, case, message):
    model, audio, extra = deployed_tiny.tflite, test_clips[0].path, []
    if case == "missing_audio":
        audio = tmp_path / "nope.wav"
    elif case == "corrupt_audio":
        audio = tmp_path / "corrupt.wav"
        audio.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    elif case == "no_manifest":
        model = tmp_path / "bare" / "model.tflite"
        model.parent.mkdir()
        shutil.copy(deployed_tiny.tflite, model)
    elif case == "missing_model":
        model = tmp_path / "none.tflite"
    else:
        extra = ["--realtime"]
    code, out, err = run(capsys, "predict", model, audio, *extra)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_export_cli_finds_the_run_config_and_verifies(deployed_tiny, capsys):
    d = deployed_tiny
    code, out, _ = run(capsys, "export", d.model_path, "--quantization", "float16")
    assert code == 0
    target = d.run_dir / "tflite_fp16" / "model.tflite"
    assert f"exported {target}" in out
    parity = json.loads((target.parent / "manifest.json").read_text())["extra"]["parity"]
    assert f"verified on {parity['num_samples']} devel chunks" in out
    assert parity["max_abs_diff"] <= 1e-2 and parity["top1_agreement"] >= 0.98
    assert (parity["min_agreement"], parity["max_prob_diff"]) == (0.98, 0.02)  # the float16 defaults
    code, _, err = run(capsys, "export", d.model_path, "--classes", "a,b")
    assert code == 2 and "2 class names (a, b) for a model with 3 outputs" in err


def test_export_cli_fails_when_the_export_misses_the_limit(deployed_tiny, tmp_path, capsys):
    """float16 weights always move the probabilities a little (about 1e-3): a 1e-6 limit must fail, say by how
    much, and leave nothing behind."""
    out_path = tmp_path / "strict" / "model.tflite"
    code, out, err = run(capsys, "export", deployed_tiny.model_path, "--quantization", "float16",
                         "--max-prob-diff", "1e-6", "--out", out_path)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "float16 export does not match the Keras model on" in err and "devel chunks" in err
    allowed = err.split("exceeds the allowed 1e-06 by ")[1].split(" ")[0]
    assert float(allowed) > 1e-5
    assert not out_path.parent.exists()
    code, _, err = run(capsys, "export", deployed_tiny.model_path, "--min-agreement", "1.5")
    assert code == 2 and "--min-agreement must be between 0 and 1, got 1.5" in err


def test_export_cli_without_audio_checks_on_synthetic_chunks(deployed_tiny, tmp_path, capsys):
    d = deployed_tiny
    config = tmp_path / "config.yaml"
    config.write_text(d.config_path.read_text().replace(str(d.cfg.data.manifest), str(tmp_path / "gone.csv")))
    out_path = tmp_path / "fp32" / "model.tflite"
    code, out, err = run(capsys, "export", d.model_path, "--config", config, "--classes", ",".join(d.classes),
                         "--out", out_path)
    assert code == 0, err
    assert "verified on 64 synthetic chunks (tones and noise; no devel or train audio found)" in out
    parity = json.loads((out_path.parent / "manifest.json").read_text())["extra"]["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-3


def test_fifos_and_devices_are_never_opened(tmp_path):
    """A FIFO would block forever and /dev/zero never ends: named as what they are, counted among the skipped."""
    import os

    from dsl_fed.cli.device import _audio_files
    from dsl_fed.errors import DslFedError

    (tmp_path / "d").mkdir()
    sf.write(tmp_path / "d" / "a.wav", np.zeros(1600, np.float32), 16000)
    os.mkfifo(tmp_path / "d" / "pipe.wav")
    os.symlink("/dev/zero", tmp_path / "d" / "zero.wav")
    assert _audio_files(tmp_path / "d", (".wav",)) == ([tmp_path / "d" / "a.wav"],
                                                       [tmp_path / "d" / "pipe.wav", tmp_path / "d" / "zero.wav"])
    with pytest.raises(DslFedError, match="pipe.wav: not a regular file or folder"):
        _audio_files(tmp_path / "d" / "pipe.wav", (".wav",))
    with pytest.raises(DslFedError, match="zero.wav: not a regular file"):
        list(load_audio(tmp_path / "d" / "zero.wav"))
