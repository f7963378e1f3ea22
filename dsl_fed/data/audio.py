"""Read one audio file as float32 mono at the model's sample rate: whole (`load_audio`) or in blocks
(`AudioStream`, for recordings of any length in bounded memory).

Every recording reaches the model through these two, so the checks live here: a file that is missing, not a
regular file, empty, corrupt, of an unsupported type or holds NaN/inf samples is a `DslFedError` naming the
file, never a crash deep inside TensorFlow. An all-silent file is *not* an error (silence is valid audio;
normalisation copes with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from dsl_fed.errors import DslFedError, first_line

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")
"""File types accepted everywhere (manifests, folder layouts, `load_audio`), lower case with the dot."""

MIN_RATE, MAX_RATE = 1000, 768_000  # header rates outside this are corrupt (resampling 1 Hz would need terabytes)
MIN_SECONDS = 0.01  # shorter clips (a few samples) are decodable but probably broken: `data-stats` counts them
MAX_PEAK = 1000.0  # largest accepted sample magnitude

# libsndfile decodes all four natively (MP3 since 1.1); older builds fall back to audioread for these.
_FALLBACK_EXTENSIONS = (".ogg", ".mp3")


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode `path`, average its channels and resample to `sample_rate`.

    Args:
        path: A `.wav`, `.flac`, `.ogg` or `.mp3` file.
        sample_rate: Target rate in Hz; the file is resampled (soxr, high quality) when it differs.

    Returns:
        1-D float32 array; integer PCM is scaled to [-1, 1).

    Raises:
        DslFedError: missing file, unsupported extension, zero-length or undecodable file, an implausible
            header rate, NaN/inf or huge sample values.
    """
    path = Path(path)
    ext = _check_file(path)
    samples, file_rate = _decode(path, ext)
    if samples.size == 0:
        raise DslFedError(f"{path}: audio file contains no samples")
    _check_rate(path, file_rate)
    mono = _mono(path, samples)
    if file_rate != sample_rate:
        mono = _resample(mono, file_rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


class AudioStream:
    """The samples of `load_audio(path, sample_rate)`, decoded and resampled block by block.

    Memory stays at a few blocks whatever the recording's length (a 24-hour file streams like a 3-second one);
    the samples equal `load_audio`'s (soxr's streaming resampler is the same filter). Files libsndfile cannot
    open (some MP3/OGG, decoded by audioread) are read whole. `samples` counts what has been yielded.

    Args:
        path: Audio file.
        sample_rate: Target rate in Hz.
        block: Frames read from the file at a time.
    """

    def __init__(self, path: str | Path, sample_rate: int = 16000, block: int = 1 << 16) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.block = block
        self.samples = 0
        self._ext = _check_file(self.path)

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            source = sf.SoundFile(str(self.path))
        except (sf.LibsndfileError, RuntimeError, ValueError):
            whole = load_audio(self.path, self.sample_rate)  # names the problem, or decodes with the fallback
            self.samples = len(whole)
            yield whole
            return
        with source:
            _check_rate(self.path, source.samplerate)
            resampler = None
            if source.samplerate != self.sample_rate:
                import soxr  # librosa's "soxr_hq" resampler, as a stream

                resampler = soxr.ResampleStream(source.samplerate, self.sample_rate, 1, dtype="float32", quality="HQ")
            read = 0
            while True:
                try:
                    frames = source.read(self.block, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
                    raise DslFedError(f"{self.path}: cannot decode audio ({first_line(exc)})") from None
                read += len(frames)
                last = len(frames) < self.block
                mono = _mono(self.path, frames) if len(frames) else np.zeros(0, np.float32)
                if resampler is not None:
                    mono = resampler.resample_chunk(mono, last=last)
                    if last:  # librosa's length: ceil(frames x ratio), the flushed tail cut or zero-padded to it
                        total = math.ceil(read * (self.sample_rate / source.samplerate))
                        mono = np.pad(mono, (0, max(0, total - self.samples - len(mono))))[: total - self.samples]
                if len(mono):
                    self.samples += len(mono)
                    yield np.ascontiguousarray(mono, dtype=np.float32)
                if last:
                    break
            if read == 0:
                raise DslFedError(f"{self.path}: audio file contains no samples")


def _check_file(path: Path) -> str:
    """The file's lower-case extension, after checking it exists, is a regular file, non-empty and supported."""
    if not path.is_file():
        if path.exists():  # a FIFO or device would block or never end
            raise DslFedError(f"{path}: not a regular file (a folder, FIFO, device or socket)")
        raise DslFedError(f"{path}: audio file not found")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DslFedError(
            f"{path}: unsupported audio file type {ext or '(no extension)'!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    if path.stat().st_size == 0:
        raise DslFedError(f"{path}: audio file is empty (0 bytes)")
    return ext


def _check_rate(path: Path, file_rate: int) -> None:
    if not MIN_RATE <= file_rate <= MAX_RATE:
        raise DslFedError(f"{path}: the header claims {file_rate} Hz; expected {MIN_RATE}-{MAX_RATE} Hz")


def _mono(path: Path, samples: np.ndarray) -> np.ndarray:
    """Finite, plausibly scaled (frames, channels) samples averaged to one channel."""
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise DslFedError(f"{path}: audio contains {bad} NaN/inf sample value(s)")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > MAX_PEAK:  # float files hold [-1, 1]; huge values overflow the channel mix-down and the spectrogram
        raise DslFedError(f"{path}: sample values reach {peak:.3g}; float audio is expected in [-1, 1]")
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]


def _decode(path: Path, ext: str) -> tuple[np.ndarray, int]:
    """Return (frames, channels) float32 samples and the file's rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data, int(rate)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        reason = first_line(exc)
        if ext in _FALLBACK_EXTENSIONS:
            fallback = _decode_audioread(path)
            if fallback is not None:
                return fallback
        raise DslFedError(f"{path}: cannot decode audio ({reason})") from None


def _decode_audioread(path: Path) -> tuple[np.ndarray, int] | None:
    """Decode with audioread (ffmpeg/gstreamer backends) or return None when no backend can."""
    try:
        import audioread
    except ImportError:
        return None
    try:
        with audioread.audio_open(str(path)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            pcm = b"".join(f)
    except Exception:  # audioread raises backend-specific types; any failure means "could not decode"
        return None
    data = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    usable = data.size - data.size % channels
    return data[:usable].reshape(-1, channels), rate


def _resample(x: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    import librosa  # imported lazily: it is slow to import and most corpora are already 16 kHz

    return librosa.resample(x.astype(np.float32), orig_sr=orig_rate, target_sr=target_rate, res_type="soxr_hq")
