"""Ring buffer and streaming predictor: counts, window contents and pacing, with a fake model and clock."""

import numpy as np
import pytest

from dsl_fed.errors import DslFedError
from dsl_fed.stream import RingBuffer, StreamPredictor, expected_predictions, replay


class RecordingModel:
    """Stands in for a TFLite runner: remembers each window, returns [first sample, last sample]."""

    def __init__(self):
        self.windows = []

    def __call__(self, window):
        self.windows.append(window.copy())
        return np.array([window[0], window[-1]], dtype=np.float32)


def test_ring_buffer_wraps_and_reads_oldest_first():
    ring = RingBuffer(5)
    ring.write(np.arange(3))
    assert ring.read().tolist() == [0, 1, 2]
    ring.write(np.arange(3, 7))  # wraps: 0 and 1 fall out
    assert ring.read().tolist() == [2, 3, 4, 5, 6]
    assert len(ring) == 5 and ring.total == 7
    ring.write(np.arange(7, 20))  # longer than the capacity: only the newest 5 survive
    assert ring.read().tolist() == [15, 16, 17, 18, 19]
    assert ring.total == 20


@pytest.mark.parametrize("n", [100, 101, 129, 130, 131, 250, 1000])
@pytest.mark.parametrize("block", [1, 7, 30, 64, 1000])
def test_one_prediction_per_hop_for_any_block_size(n, block):
    window, hop = 100, 30
    signal = np.arange(n, dtype=np.float32)
    model = RecordingModel()
    preds = list(replay(signal, StreamPredictor(model, window, hop), block=block, sample_rate=16000))
    assert len(preds) == (n - window) // hop + 1 == expected_predictions(n, window, hop)
    for k, (p, seen) in enumerate(zip(preds, model.windows)):
        assert (p.start, p.end) == (k * hop, k * hop + window)
        np.testing.assert_array_equal(seen, signal[k * hop : k * hop + window])  # exactly the offline chunk
        assert p.probabilities.tolist() == [k * hop, k * hop + window - 1]
        assert not p.padded


def test_short_stream_gets_one_zero_padded_prediction():
    model = RecordingModel()
    preds = list(replay(np.ones(40, np.float32), StreamPredictor(model, 100, 30), block=16, sample_rate=16000))
    assert len(preds) == 1 == expected_predictions(40, 100, 30)
    assert preds[0].padded
    assert model.windows[0][:40].sum() == 40 and model.windows[0][40:].sum() == 0
    assert list(replay(np.zeros(0, np.float32), StreamPredictor(model, 100, 30), 16, 16000)) == []
    assert expected_predictions(0, 100, 30) == 0


def test_latency_is_measured_around_the_model_call():
    ticks = iter([10.0, 10.25, 11.0, 11.5])
    predictor = StreamPredictor(lambda w: np.zeros(2), window=4, hop=2, clock=lambda: next(ticks))
    preds = predictor.push(np.zeros(6, np.float32))
    assert [p.latency_ms for p in preds] == [250.0, 500.0]


def test_realtime_pacing_sleeps_until_each_block_would_have_been_recorded():
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    predictor = StreamPredictor(lambda w: np.zeros(2), window=800, hop=400, clock=lambda: now[0])
    signal = np.zeros(1600, np.float32)  # 0.2 s at 8 kHz
    preds = list(replay(signal, predictor, block=400, sample_rate=8000, realtime=True, sleep=sleep, clock=lambda: now[0]))
    assert len(preds) == 3
    assert sleeps == pytest.approx([0.05, 0.05, 0.05, 0.05])  # one block = 50 ms
    assert now[0] == pytest.approx(0.2)


def test_bad_sizes_are_user_errors():
    with pytest.raises(DslFedError, match="window and hop"):
        StreamPredictor(lambda w: w, window=0, hop=1)
    with pytest.raises(DslFedError, match="block size"):
        list(replay(np.zeros(10), StreamPredictor(lambda w: w, 4, 2), block=0, sample_rate=16000))
    with pytest.raises(DslFedError, match="capacity"):
        RingBuffer(0)


# ------------------------------------------------------------------------------------- files of any length


class FakeRunner:
    """The part of `TFLiteRunner` that `predict_file` uses: two "probabilities" from each window's ends."""

    def __init__(self, window):
        self.input_shape, self.path = (window,), "fake.tflite"

    def predict_one(self, x):
        return np.array([x[0], x[-1]], dtype=np.float32)


def test_a_file_streams_block_by_block_with_the_samples_of_a_whole_decode(tmp_path):
    import soundfile as sf

    from dsl_fed.data.audio import AudioStream, load_audio

    rng = np.random.default_rng(0)
    for rate in (16000, 22050):  # as stored, and resampled by soxr's stream (the same filter as librosa's soxr_hq)
        path = tmp_path / f"{rate}.wav"
        sf.write(path, 0.3 * rng.standard_normal((rate * 3 + 17, 2)), rate)
        stream = AudioStream(path, 16000, block=1000)
        blocks = list(stream)
        assert max(len(b) for b in blocks) <= 2000 and stream.samples == sum(len(b) for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), load_audio(path, 16000))


def test_predicting_a_long_recording_keeps_memory_bounded(tmp_path):
    """20 minutes at 16 kHz: decoded whole it would be 77 MB of float32 (a 24-hour file 5.5 GB)."""
    import tracemalloc

    import soundfile as sf

    from dsl_fed.data.audio import load_audio
    from dsl_fed.data.chunking import chunk_signal, count_chunks
    from dsl_fed.litert import predict_file

    rate, window, hop, minutes = 16000, 48000, 24000, 20
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(0.1 * rng.standard_normal(rate * 60).astype(np.float32))
    for stream in (False, True):
        tracemalloc.start()
        result = predict_file(FakeRunner(window), path, rate, window, hop, stream=stream)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.duration_s == minutes * 60
        count = expected_predictions if stream else count_chunks
        assert len(result.chunks) == count(minutes * 60 * rate, window, hop) == 799
        assert peak < 8e6, f"{peak / 1e6:.0f} MB traced"
    short = tmp_path / "short.wav"  # and the windows are exactly those of the whole file's chunking
    sf.write(short, 0.1 * rng.standard_normal(rate * 7 + 123), rate)
    chunks = chunk_signal(load_audio(short, rate), window, hop)
    got = np.array([c.probabilities for c in predict_file(FakeRunner(window), short, rate, window, hop).chunks])
    np.testing.assert_array_equal(got, chunks[:, [0, -1]])
