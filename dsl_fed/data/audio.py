"""Read one audio file as float32 mono at the model's sample rate.

Every recording reaches the model through `load_audio`, so the checks live here: a file that is missing,
empty, corrupt, of an unsupported type or holds NaN/inf samples is a `DslFedError` naming the file, never a
crash deep inside TensorFlow. An all-silent file is *not* an error (silence is valid audio; normalisation
copes with it).
"""

from __future__ import annotations

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
    if not path.is_file():
        raise DslFedError(f"{path}: audio file not found")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DslFedError(
            f"{path}: unsupported audio file type {ext or '(no extension)'!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    if path.stat().st_size == 0:
        raise DslFedError(f"{path}: audio file is empty (0 bytes)")

    samples, file_rate = _decode(path, ext)
    if samples.size == 0:
        raise DslFedError(f"{path}: audio file contains no samples")
    if not MIN_RATE <= file_rate <= MAX_RATE:
        raise DslFedError(f"{path}: the header claims {file_rate} Hz; expected {MIN_RATE}-{MAX_RATE} Hz")
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise DslFedError(f"{path}: audio contains {bad} NaN/inf sample value(s)")
    peak = float(np.abs(samples).max())
    if peak > MAX_PEAK:  # float files hold [-1, 1]; huge values overflow the channel mix-down and the spectrogram
        raise DslFedError(f"{path}: sample values reach {peak:.3g}; float audio is expected in [-1, 1]")

    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate != sample_rate:
        mono = _resample(mono, file_rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


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
