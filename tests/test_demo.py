import csv

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.data.demo import CLASSES, make_demo_corpus
from dsl_fed.data.manifest import read_manifest
from dsl_fed.errors import DslFedError

SMALL = dict(speakers=3, clips=1, min_seconds=1.0, max_seconds=1.5, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a = make_demo_corpus(tmp_path / "a", seed=1, **SMALL).parent
    b = make_demo_corpus(tmp_path / "b", seed=1, **SMALL).parent
    c = make_demo_corpus(tmp_path / "c", seed=2, **SMALL).parent
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert len(files_a) == 3 * 3 * 1 + 2  # the clips, manifest.csv and the record of what was written
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()  # same names ...
    differing = [name for name in files_a if name.endswith(".wav") and files_a[name] != files_c[name]]
    assert len(differing) == 9  # ... but every clip is different audio


def test_regenerating_into_the_same_folder_is_stable(tmp_path):
    first = _files(make_demo_corpus(tmp_path, seed=0, **SMALL).parent)
    assert _files(make_demo_corpus(tmp_path, seed=0, **SMALL).parent) == first
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temp files behind


def test_a_folder_is_written_only_if_new_empty_or_an_earlier_corpus_of_ours(tmp_path):
    """A user's manifest.csv is never overwritten; an earlier generated corpus is replaced file by file, and
    nothing else in its folder is touched."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.csv").write_text("filename,label\nmine.wav,x\n")
    with pytest.raises(DslFedError, match="manifest.csv was not written by dsl_fed .*nothing was written"):
        make_demo_corpus(theirs, **SMALL)
    assert _files(theirs) == {"manifest.csv": b"filename,label\nmine.wav,x\n"}
    ours = tmp_path / "ours"
    make_demo_corpus(ours, speakers=4, clips=1, min_seconds=1.0, max_seconds=1.5, progress=False)
    (ours / "notes.txt").write_text("keep me")
    make_demo_corpus(ours, **SMALL)  # one speaker fewer: its clips go, the notes stay
    assert not (ours / "audio" / "spk04").exists() and (ours / "notes.txt").read_text() == "keep me"
    assert _files(ours).keys() - {"notes.txt"} == _files(make_demo_corpus(tmp_path / "fresh", **SMALL).parent).keys()
    (ours / "manifest.csv").write_text((ours / "manifest.csv").read_text() + "audio/x.wav,flat,spkX,train\n")
    with pytest.raises(DslFedError, match="was not written by dsl_fed \\(or was edited since\\)"):
        make_demo_corpus(ours, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "ours", "theirs"]  # no staging folder left


def test_manifest_structure(demo_manifest):
    rows = list(csv.DictReader(demo_manifest.open()))
    assert list(rows[0]) == ["filename", "label", "speaker", "partition"]
    manifest = read_manifest(demo_manifest)
    assert manifest.classes == list(CLASSES) == ["falling", "flat", "rising"]
    sizes = {p: len(manifest.speakers(p)) for p in ("train", "devel", "test")}
    assert sizes == {"train": 4, "devel": 2, "test": 2}
    assert len(manifest.clips) == 8 * 3 * 3
    partition_of = {}
    for clip in manifest.clips:  # speaker-independent: each speaker in exactly one partition
        assert partition_of.setdefault(clip.speaker, clip.partition) == clip.partition
    for speaker in manifest.speakers():
        labels = [c.label for c in manifest.clips if c.speaker == speaker]
        assert labels.count("falling") == labels.count("flat") == labels.count("rising") == 3
    for clip in manifest.clips:
        info = sf.info(clip.path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 2.0 <= info.duration <= 4.0


def test_partition_counts_for_other_speaker_numbers(tmp_path):
    for speakers, expected in [(3, (1, 1, 1)), (5, (3, 1, 1)), (10, (6, 2, 2))]:
        rows = list(csv.DictReader(make_demo_corpus(tmp_path / str(speakers), speakers=speakers, clips=1,
                                                    min_seconds=0.5, max_seconds=0.5, progress=False).open()))
        part = {r["speaker"]: r["partition"] for r in rows}
        assert tuple(list(part.values()).count(p) for p in ("train", "devel", "test")) == expected


def _energy_slope(x, frame=320):
    """Median over voiced runs of the frame-energy slope (dB per 20 ms frame)."""
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
    voiced = np.append(db > db.max() - 25, False)
    slopes, start = [], None
    for i, v in enumerate(voiced):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start >= 6:
                slopes.append(np.polyfit(np.arange(i - start), db[start:i], 1)[0])
            start = None
    return float(np.median(slopes))


def _f0(x, sr=16000, frame=1600):
    """Autocorrelation pitch of the loudest 100 ms."""
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    seg = frames[np.argmax((frames**2).sum(axis=1))]
    ac = np.correlate(seg - seg.mean(), seg - seg.mean(), "full")[frame - 1 :]
    lo, hi = sr // 400, sr // 60
    return sr / (lo + np.argmax(ac[lo:hi]))


def test_classes_carry_their_cue_for_every_speaker(demo_manifest):
    manifest = read_manifest(demo_manifest)
    for speaker in manifest.speakers():
        mean = {}
        for label in CLASSES:
            paths = [c.path for c in manifest.clips if c.speaker == speaker and c.label == label]
            mean[label] = np.mean([_energy_slope(sf.read(p)[0]) for p in paths])
        assert mean["falling"] < -0.2 and mean["rising"] > 0.2 and abs(mean["flat"]) < 0.15, (speaker, mean)


def test_speakers_have_their_own_voice(demo_manifest):
    manifest = read_manifest(demo_manifest)
    medians = []
    for speaker in manifest.speakers():
        pitches = [_f0(sf.read(c.path)[0]) for c in manifest.clips if c.speaker == speaker and c.label == "flat"]
        medians.append(np.median(pitches))
        assert max(pitches) / min(pitches) < 1.35  # a speaker's level pitch is consistent ...
    assert max(medians) / min(medians) > 1.8  # ... and speakers' voices differ widely


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(speakers=2), "--speakers must be >= 3"),
        (dict(clips=0), "--clips must be >= 1"),
        (dict(seed=-1), "--seed must be >= 0"),
        (dict(min_seconds=3.0, max_seconds=2.0), "clip duration range"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DslFedError, match=message):
        make_demo_corpus(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "manifest.csv").exists()
