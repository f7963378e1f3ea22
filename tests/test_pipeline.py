from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import dsl_fed.data.pipeline as pipeline
from dsl_fed.config import DataConfig
from dsl_fed.data.chunking import count_chunks
from dsl_fed.data.manifest import Clip, read_manifest
from dsl_fed.data.pipeline import ChunkSet, load_chunks, make_dataset
from dsl_fed.errors import DslFedError

CFG = DataConfig(manifest="unused", sample_rate=1000, chunk_seconds=0.1, hop_seconds=0.05)  # 100 / 50 samples
CLASSES = ["a", "b", "c"]


@pytest.fixture
def clips(tmp_path):
    """Four clips at 1 kHz: 250, 100, 30 samples and an all-silent one of 160 samples."""
    out = []
    specs = [(250, "b", "s1", 0.5), (100, "a", "s2", 2.0), (30, "c", "s1", 0.1), (160, "a", "s3", 0.0)]
    for i, (n, label, speaker, scale) in enumerate(specs):
        path = tmp_path / f"{i}.wav"
        sf.write(path, scale * np.sin(np.arange(n) * 0.3), 1000, subtype="FLOAT")
        out.append(Clip(10 + i, path, label, speaker, "train"))
    return out


def test_load_chunks_shapes_dtypes_and_bookkeeping(clips):
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    per_clip = [count_chunks(n, 100, 50) for n in (250, 100, 30, 160)]
    assert per_clip == [4, 1, 1, 3]
    assert len(chunks) == 9 and chunks.waveforms.shape == (9, 100) and chunks.chunk_samples == 100
    assert chunks.waveforms.dtype == np.float32 and chunks.labels.dtype == np.int32 and chunks.clip_ids.dtype == np.int32
    assert chunks.labels.tolist() == [1] * 4 + [0] + [2] + [0] * 3
    assert chunks.clip_ids.tolist() == [10] * 4 + [11] + [12] + [13] * 3
    assert chunks.speakers.tolist() == ["s1"] * 4 + ["s2"] + ["s1"] + ["s3"] * 3
    peaks = np.max(np.abs(chunks.waveforms), axis=1)
    assert peaks.tolist() == [1.0] * 6 + [0.0] * 3  # normalised per chunk; the silent clip stays silent
    assert not chunks.waveforms[5, 30:].any()  # the 30-sample clip is zero-padded to one chunk


def test_each_file_is_decoded_once_across_epochs(clips, monkeypatch):
    calls = []
    real = pipeline.load_audio

    def counting(path, sample_rate=16000):
        calls.append(Path(path).name)
        return real(path, sample_rate)

    monkeypatch.setattr(pipeline, "load_audio", counting)
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    ds = make_dataset(chunks, 3, batch_size=4, shuffle=True, seed=0)
    for _ in range(3):
        assert sum(int(x.shape[0]) for x, _ in ds) == 9
    assert sorted(calls) == ["0.wav", "1.wav", "2.wav", "3.wav"]


def test_make_dataset_batches_with_one_hot_labels(clips):
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    batches = list(make_dataset(chunks, 3, batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 100), (4, 100), (1, 100)]
    assert [tuple(y.shape) for _, y in batches] == [(4, 3), (4, 3), (1, 3)]
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    assert x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_array_equal(x, chunks.waveforms)  # unshuffled: original order
    np.testing.assert_array_equal(y, np.eye(3)[chunks.labels])


def test_shuffle_is_a_deterministic_permutation(clips):
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    numbered = np.repeat(np.arange(len(chunks), dtype=np.float32)[:, None], chunks.chunk_samples, axis=1)
    chunks = ChunkSet(numbered, chunks.labels, chunks.clip_ids, chunks.speakers)  # chunk i is all i

    def order(seed):
        ds = make_dataset(chunks, 3, batch_size=3, shuffle=True, seed=seed)
        return [[int(i) for x, _ in ds for i in x.numpy()[:, 0]] for _ in range(2)]  # two epochs

    first = order(1)
    assert first == order(1)
    assert sorted(first[0]) == list(range(9)) and first[0] != first[1]  # reshuffled every epoch
    assert order(2) != first


def test_concat(clips):
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    both = ChunkSet.concat([chunks, chunks])
    assert len(both) == 18 and both.clip_ids.tolist() == chunks.clip_ids.tolist() * 2
    np.testing.assert_array_equal(both.waveforms[9:], chunks.waveforms)
    assert both.speakers.tolist()[9:] == chunks.speakers.tolist()


def test_errors(clips):
    with pytest.raises(DslFedError, match="no clips to load"):
        load_chunks([], CFG, CLASSES)
    with pytest.raises(DslFedError, match=r"0.wav: label 'b' is not one of the model's classes \(a, c\)"):
        load_chunks(clips[:1], CFG, ["a", "c"], progress=False)
    missing = Clip(0, clips[0].path.with_name("gone.wav"), "a", "s", "train")
    with pytest.raises(DslFedError, match="gone.wav: audio file not found"):
        load_chunks([missing], CFG, CLASSES, progress=False)
    chunks = load_chunks(clips, CFG, CLASSES, progress=False)
    with pytest.raises(DslFedError, match="zero chunks"):
        make_dataset(ChunkSet(chunks.waveforms[:0], chunks.labels[:0], chunks.clip_ids[:0], chunks.speakers[:0]), 3, 4)
    with pytest.raises(DslFedError, match="out of range for 2 classes"):
        make_dataset(chunks, 2, 4)
    with pytest.raises(DslFedError, match="inconsistent shapes"):
        ChunkSet(chunks.waveforms, chunks.labels[:2], chunks.clip_ids, chunks.speakers)


def test_demo_corpus_loads_at_one_second_chunks(demo_manifest):
    manifest = read_manifest(demo_manifest)
    cfg = DataConfig(manifest=str(demo_manifest), chunk_seconds=1.0, hop_seconds=0.5)
    train = manifest.partition("train")
    chunks = load_chunks(train, cfg, manifest.classes, progress=False)
    lengths = [sf.info(c.path).frames for c in train]
    assert len(chunks) == sum(count_chunks(n, 16000, 8000) for n in lengths)
    assert chunks.waveforms.shape[1] == 16000
    assert set(chunks.labels.tolist()) == {0, 1, 2} and set(chunks.speakers.tolist()) == set(manifest.speakers("train"))
