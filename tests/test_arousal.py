"""The eSpeak NG arousal corpus: layout, partitions, determinism (whatever the process count), cues that overlap."""

import hashlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.data.arousal import LEVELS, draw_speaker, make_arousal_corpus, ssml
from dsl_fed.data.manifest import read_manifest
from dsl_fed.errors import DslFedError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (.ci/run installs it)")


def digest(root) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.wav")))).hexdigest()


@needs_espeak
def test_corpus_is_speaker_structured_deterministic_and_16k(tmp_path):
    manifest_path = make_arousal_corpus(tmp_path / "a", speakers=10, clips=1, seed=3, progress=False, jobs=2)
    manifest = read_manifest(manifest_path)
    assert manifest.classes == sorted(LEVELS) and len(manifest.clips) == 10 * len(LEVELS)
    parts = {p: set(manifest.speakers(p)) for p in ("train", "devel", "test")}
    assert [len(parts[p]) for p in ("train", "devel", "test")] == [6, 2, 2]
    assert not (parts["train"] & parts["devel"]) and not (parts["train"] & parts["test"])
    seconds = {}
    for clip in manifest.clips:
        audio, rate = sf.read(clip.path)
        assert rate == 16000 and audio.ndim == 1 and np.abs(audio).max() > 0.5
        seconds[clip.speaker, clip.label] = audio.size / rate
    # Rate is one cue: within every speaker low arousal is slower than high ...
    speakers = sorted(parts["train"] | parts["devel"] | parts["test"])
    assert all(seconds[s, "low"] > seconds[s, "high"] for s in speakers)
    # ... but not across speakers: some speaker's high clip is longer than another speaker's low clip.
    assert max(seconds[s, "high"] for s in speakers) > min(seconds[s, "low"] for s in speakers)
    again = make_arousal_corpus(tmp_path / "b", speakers=10, clips=1, seed=3, progress=False, jobs=1)
    assert digest(manifest_path.parent) == digest(again.parent)
    assert again.read_text() == manifest_path.read_text()
    assert digest(make_arousal_corpus(tmp_path / "c", speakers=10, clips=1, seed=4, progress=False).parent) \
        != digest(manifest_path.parent)


def test_sentences_do_not_depend_on_the_class():
    speaker = draw_speaker(np.random.default_rng(0))
    words = lambda text: text.split('">', 1)[1].split("<break")[0]  # the first phrase's words
    texts = {level: words(ssml(speaker, level, np.random.default_rng([7, 1]))[0]) for level in LEVELS}
    assert len(set(texts.values())) == 1  # same random draw -> same sentence whatever the level
    assert len({words(ssml(speaker, "mid", np.random.default_rng([7, k]))[0]) for k in range(20)}) > 10


def test_bad_arguments_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DslFedError, match="--speakers"):
        make_arousal_corpus(tmp_path, speakers=2)
    with pytest.raises(DslFedError, match="--clips"):
        make_arousal_corpus(tmp_path, clips=0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DslFedError, match="apt-get install espeak-ng"):
        make_arousal_corpus(tmp_path, speakers=3, clips=1)
    assert not any(tmp_path.iterdir())
