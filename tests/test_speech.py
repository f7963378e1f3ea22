"""The eSpeak NG spoken-command corpus: layout, speaker-independent partitions, determinism, clear errors."""

import hashlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.data.manifest import read_manifest
from dsl_fed.data.speech import WORDS, make_speech_corpus
from dsl_fed.errors import DslFedError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (.ci/run installs it)")


@needs_espeak
def test_corpus_is_speaker_structured_deterministic_and_16k(tmp_path):
    manifest_path = make_speech_corpus(tmp_path / "a", speakers=5, clips=1, seed=3, progress=False)
    manifest = read_manifest(manifest_path)
    assert manifest.classes == sorted(WORDS) and len(manifest.clips) == 5 * len(WORDS)
    parts = {p: set(manifest.speakers(p)) for p in ("train", "devel", "test")}
    assert [len(parts[p]) for p in ("train", "devel", "test")] == [3, 1, 1]
    assert not (parts["train"] & parts["devel"]) and not (parts["train"] & parts["test"])
    durations = []
    for clip in manifest.clips:
        audio, rate = sf.read(clip.path)
        assert rate == 16000 and audio.ndim == 1
        durations.append(audio.size / rate)
        assert np.abs(audio).max() > 0.1  # speech, not just the noise floor
    assert 1.0 <= min(durations) and max(durations) <= 2.0
    again = make_speech_corpus(tmp_path / "b", speakers=5, clips=1, seed=3, progress=False)
    digest = lambda root: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.wav")))).hexdigest()
    assert digest(manifest_path.parent) == digest(again.parent)
    assert again.read_text() == manifest_path.read_text()
    other = make_speech_corpus(tmp_path / "c", speakers=5, clips=1, seed=4, progress=False)
    assert digest(other.parent) != digest(manifest_path.parent)


def test_missing_espeak_and_bad_arguments_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DslFedError, match="--speakers"):
        make_speech_corpus(tmp_path, speakers=2)
    with pytest.raises(DslFedError, match="--clips"):
        make_speech_corpus(tmp_path, clips=0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DslFedError, match="apt-get install espeak-ng"):
        make_speech_corpus(tmp_path, speakers=3, clips=1)
    assert not any(tmp_path.iterdir())
