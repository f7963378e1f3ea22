import numpy as np
import pytest
import soundfile as sf

from dsl_fed.data.audio import SUPPORTED_EXTENSIONS, load_audio
from dsl_fed.errors import DslFedError


def test_stereo_440hz_at_44k1_loads_as_16k_mono_with_peak_at_440(tmp_path):
    rate, seconds = 44100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    stereo = np.stack([tone, 0.8 * tone], axis=1)  # different levels per channel: mono = mean
    path = tmp_path / "tone.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")

    x = load_audio(path, 16000)

    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.shape[0] - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    freqs = np.fft.rfftfreq(x.shape[0], 1 / 16000)
    bin_width = freqs[1]
    assert abs(freqs[np.argmax(spectrum)] - 440.0) <= bin_width
    assert np.max(np.abs(x[1000:-1000])) == pytest.approx(0.45, abs=0.01)  # mean of 0.5 and 0.4


def test_same_rate_int16_is_scaled_to_unit_range_without_resampling(tmp_path):
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    path = tmp_path / "a.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    x = load_audio(path, 16000)
    np.testing.assert_allclose(x, [0.0, 0.5, -1.0, 32767 / 32768], atol=1e-6)


WRITERS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"), ".mp3": ("MP3", "MPEG_LAYER_III")}


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_every_supported_format_round_trips_whatever_the_case_of_its_extension(tmp_path, ext):
    fmt, subtype = WRITERS[ext]  # a KeyError here: a newly supported extension needs a round-trip test
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {subtype}")
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    path = tmp_path / f"tone{ext.upper()}"
    sf.write(path, tone, 16000, format=fmt, subtype=subtype)
    x = load_audio(path, 16000)
    assert x.dtype == np.float32
    assert 15000 <= x.shape[0] <= 17500  # lossy codecs may add encoder delay/padding
    spectrum = np.abs(np.fft.rfft(x))
    assert np.fft.rfftfreq(x.shape[0], 1 / 16000)[np.argmax(spectrum)] == pytest.approx(1000.0, abs=2.0)


def test_all_silent_clip_is_valid(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(8000), 16000)
    x = load_audio(path)
    assert x.shape == (8000,) and not x.any()


def _write_nan(path):
    sf.write(path, np.array([0.1, np.nan, 0.2, 0.3], dtype=np.float32), 16000, subtype="FLOAT")


def _write_inf(path):
    sf.write(path, np.array([0.1, np.inf, -np.inf, 0.3], dtype=np.float32), 16000, subtype="FLOAT")


def _write_no_frames(path):
    sf.write(path, np.zeros(0), 16000, subtype="PCM_16")


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("missing.wav", None, "audio file not found"),
        ("empty.wav", lambda p: p.write_bytes(b""), "empty (0 bytes)"),
        ("no_frames.wav", _write_no_frames, "contains no samples"),
        ("corrupt.wav", lambda p: p.write_bytes(b"RIFF\x00\x01garbage" * 20), "cannot decode audio"),
        ("corrupt.flac", lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)), "cannot decode audio"),
        ("notes.txt", lambda p: p.write_text("hello"), "unsupported audio file type '.txt'"),
        ("nan.wav", _write_nan, "1 NaN/inf sample value(s)"),
        ("inf.wav", _write_inf, "2 NaN/inf sample value(s)"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(DslFedError) as info:
        load_audio(path)
    text = str(info.value)
    assert str(path) in text and message in text
    assert "\n" not in text
