"""A synthetic, speaker-structured corpus so the quickstart and the tests run offline in seconds.

Each speaker has a voice: median pitch, vocal-tract length (scales the formants of five vowels), spectral
tilt, breathiness, background-noise level and colour, speaking rate, expressiveness and a personal pitch-slope
habit. A clip is a sequence of voiced syllables separated by pauses. The three classes are intonation
patterns that act on every syllable:

* ``rising``: pitch glides up (a few semitones), loudness and brightness grow towards the syllable's end;
* ``falling``: the mirror image;
* ``flat``: level pitch with a little vibrato and drift, steady loudness and brightness.

The cues are visible in a Mel spectrogram even at 32x32 pixels (slanted harmonics, loudness and brightness
ramps) but overlap across speakers: expressiveness scales how strong a speaker's contours are, the personal
slope habit tilts all of a speaker's syllables, and a fraction of syllables in rising/falling clips are
flat. So a small CNN learns the task well above chance, yet not perfectly, and generalises only if it learns
the contour rather than the voice. Speakers are assigned whole to train/devel/test.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from dsl_fed.errors import DslFedError
from dsl_fed.data.corpus_folder import corpus_folder
from dsl_fed.io import atomic_path, atomic_write

CLASSES: tuple[str, ...] = ("falling", "flat", "rising")
SAMPLE_RATE = 16000
_DIRECTION = {"falling": -1.0, "flat": 0.0, "rising": 1.0}
# (F1, F2, F3) in Hz of /a/, /i/, /u/, /e/, /o/ for an average adult vocal tract.
_VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410]])
_BANDWIDTHS = (90.0, 110.0, 170.0)
_TABLE_SIZE = 2048  # wavetable length of one glottal period


@dataclass(frozen=True)
class Voice:
    """The fixed traits of one synthetic speaker."""

    f0: float  # median pitch, Hz
    tract: float  # formant scale (shorter tract -> higher formants)
    tilt: float  # harmonic amplitude ~ k ** -tilt
    breath: float  # aspiration noise relative to the voiced source
    noise_db: float  # background noise level relative to speech RMS
    noise_colour: float  # one-pole low-pass coefficient of the background noise (0 = white)
    syllable: float  # mean syllable duration, s
    expressiveness: float  # scales the class contours
    slope_habit: float  # semitones added to every syllable's glide
    gain: float  # peak level of the written files


def make_demo_corpus(
    out_dir: str | Path,
    speakers: int = 10,
    clips: int = 6,
    seed: int = 0,
    min_seconds: float = 2.0,
    max_seconds: float = 4.0,
    progress: bool = True,
) -> Path:
    """Write the demo corpus: ``out_dir/audio/<speaker>/<class>_<k>.wav`` (16 kHz, 16-bit) and a manifest.

    Args:
        out_dir: Target folder: new, empty, or holding an earlier corpus this tool wrote, which is replaced
            (`dsl_fed.data.corpus_folder`: nothing else there is ever overwritten or removed).
        speakers: Number of speakers (>= 3); about 20 % go to devel and 20 % to test (at least one each), the
            rest to train. 10 speakers -> 6 / 2 / 2.
        clips: Clips per class per speaker.
        seed: Everything (voices, clips, partition assignment) is a deterministic function of the arguments.
        min_seconds: Shortest clip duration.
        max_seconds: Longest clip duration.
        progress: Show a tqdm bar on stderr (only when stderr is a terminal).

    Returns:
        Path of ``out_dir/manifest.csv`` (columns filename,label,speaker,partition).
    """
    if speakers < 3:
        raise DslFedError(f"--speakers must be >= 3 (one each for train, devel and test), got {speakers}")
    if clips < 1:
        raise DslFedError(f"--clips must be >= 1 (clips per class per speaker), got {clips}")
    if seed < 0:
        raise DslFedError(f"--seed must be >= 0, got {seed}")
    if not 0.5 <= min_seconds <= max_seconds:
        raise DslFedError(f"clip duration range must satisfy 0.5 <= min <= max, got [{min_seconds}, {max_seconds}]")
    out_dir = Path(out_dir)
    names = [f"spk{k + 1:02d}" for k in range(speakers)]
    partition = assign_partitions(names, seed)

    rows: list[tuple[str, str, str, str]] = []
    total = speakers * len(CLASSES) * clips
    bar = tqdm(total=total, desc="synthesising demo corpus", unit="clip", disable=None if progress else True,
               file=sys.stderr, leave=False)
    with corpus_folder(out_dir) as folder, bar:
        for k, name in enumerate(names):
            voice = _draw_voice(np.random.default_rng([seed, k]))
            for c, label in enumerate(CLASSES):
                for j in range(clips):
                    rng = np.random.default_rng([seed, k, c, j, 1])
                    seconds = rng.uniform(min_seconds, max_seconds)
                    audio = synthesise_clip(voice, label, seconds, rng)
                    rel = f"audio/{name}/{label}_{j:02d}.wav"
                    write_wav(folder / rel, audio)
                    rows.append((rel, label, name, partition[name]))
                    bar.update()
        write_manifest(folder, rows)
    return out_dir / "manifest.csv"


def synthesise_clip(voice: Voice, label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip of `seconds` seconds: syllables of class `label` in `voice`, over background noise.

    Returns:
        float32 samples at `SAMPLE_RATE` with peak ``voice.gain``.
    """
    n = int(round(seconds * SAMPLE_RATE))
    speech = np.zeros(n, dtype=np.float64)
    t = rng.uniform(0.05, 0.25)
    while True:
        dur = voice.syllable * rng.uniform(0.75, 1.35)
        start = int(t * SAMPLE_RATE)
        if start + int(dur * SAMPLE_RATE) > n - int(0.05 * SAMPLE_RATE):
            break
        syl = _syllable(voice, label, dur, rng)
        speech[start : start + syl.size] += syl
        t += dur + rng.uniform(0.06, 0.22)
    if not speech.any():  # a clip shorter than one syllable: still voice something
        syl = _syllable(voice, label, 0.8 * seconds, rng)
        speech[: syl.size] += syl[:n]

    rms = np.sqrt(np.mean(speech[speech != 0] ** 2))
    white = rng.standard_normal(n)
    noise = lfilter([1 - voice.noise_colour], [1, -voice.noise_colour], white)
    noise *= rms * 10 ** (voice.noise_db / 20) / (np.std(noise) + 1e-12)
    mix = speech + noise
    return (mix * (voice.gain / np.max(np.abs(mix)))).astype(np.float32)


def _syllable(voice: Voice, label: str, dur: float, rng: np.random.Generator) -> np.ndarray:
    direction = _DIRECTION[label]
    if direction != 0 and rng.random() < 0.15:  # some syllables carry no contour: classes overlap
        direction = 0.0
    n = max(int(dur * SAMPLE_RATE), 64)
    u = np.linspace(-0.5, 0.5, n)  # position in the syllable

    span = voice.expressiveness * rng.uniform(6.0, 10.0)  # semitones across the syllable
    glide = direction * span + voice.slope_habit + rng.normal(0.0, 0.6)
    vibrato = 0.25 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * u * dur + rng.uniform(0, 2 * np.pi))
    semitones = glide * u + vibrato + rng.normal(0.0, 1.0)
    f0 = voice.f0 * 2.0 ** (semitones / 12.0)

    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
    harmonics = np.arange(1, int(min(7000.0, 0.45 * SAMPLE_RATE) // f0.max()) + 1)
    amplitude = harmonics.astype(np.float64) ** -voice.tilt
    # one period of the band-limited source as a wavetable, read at the running phase: 100x cheaper than
    # summing the harmonics sample by sample
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=np.complex128)
    spectrum[harmonics] = -0.5j * _TABLE_SIZE * amplitude  # irfft of this = sum_k amplitude_k sin(k phase)
    table = np.fft.irfft(spectrum, _TABLE_SIZE)
    table = np.append(table, table[0])
    source = np.interp(np.mod(phase, 2 * np.pi), np.linspace(0.0, 2 * np.pi, _TABLE_SIZE + 1), table)
    source = source / np.max(np.abs(source)) + voice.breath * rng.standard_normal(n)

    # brightness ramp: mix in a high-passed copy whose weight follows the contour
    bright = np.clip(1.0 + 3.0 * direction * voice.expressiveness * rng.uniform(0.8, 1.2) * u, 0.0, None)
    source = source + bright * lfilter([1.0, -1.9, 0.9025], [1.0], source)

    formants = _VOWELS[rng.integers(len(_VOWELS))] * voice.tract * rng.uniform(0.95, 1.05, size=3)
    voiced = source
    for freq, bw in zip(formants, _BANDWIDTHS):
        voiced = _resonate(voiced, freq, bw)
    voiced /= np.max(np.abs(voiced)) + 1e-12

    loudness_db = direction * voice.expressiveness * rng.uniform(20.0, 28.0) * u
    ramp = min(int(0.02 * SAMPLE_RATE), n // 4)
    fade = np.ones(n)
    fade[:ramp] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
    fade[n - ramp :] = fade[:ramp][::-1]
    return voiced * 10 ** (loudness_db / 20) * fade


def _resonate(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """Two-pole resonator: a formant at `freq` Hz with `bandwidth` Hz (the caller normalises the level)."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * min(freq, 0.45 * SAMPLE_RATE) / SAMPLE_RATE
    return lfilter([1.0 - r], [1.0, -2.0 * r * np.cos(theta), r * r], x)


def _draw_voice(rng: np.random.Generator) -> Voice:
    return Voice(
        f0=float(np.exp(rng.uniform(np.log(85.0), np.log(250.0)))),
        tract=float(rng.uniform(0.85, 1.2)),
        tilt=float(rng.uniform(0.8, 1.6)),
        breath=float(rng.uniform(0.02, 0.15)),
        noise_db=float(rng.uniform(-32.0, -18.0)),
        noise_colour=float(rng.uniform(0.0, 0.9)),
        syllable=float(rng.uniform(0.3, 0.5)),
        expressiveness=float(rng.uniform(0.6, 1.3)),
        slope_habit=float(rng.uniform(-1.5, 1.5)),
        gain=float(rng.uniform(0.3, 0.9)),
    )


def write_manifest(out_dir: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """``out_dir/manifest.csv`` (filename,label,speaker,partition) written atomically; returns its path."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "label", "speaker", "partition"])
    writer.writerows(rows)
    return atomic_write(out_dir / "manifest.csv", buf.getvalue())


def assign_partitions(names: list[str], seed: int) -> dict[str, str]:
    """About 20 % of the speakers to test, 20 % to devel (at least one each), the rest to train; seeded."""
    n = len(names)
    held_out = max(1, round(0.2 * n))
    order = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    parts = ["test"] * held_out + ["devel"] * held_out + ["train"] * (n - 2 * held_out)
    return {names[i]: parts[rank] for rank, i in enumerate(order)}


def write_wav(path: Path, audio: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        sf.write(str(tmp), audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def lfilter(b: list[float], a: list[float], x: np.ndarray) -> np.ndarray:
    """`scipy.signal.lfilter`, imported on first use: scipy.signal takes seconds to import and every `dsl_fed`
    command loads this module, while only synthesising demo audio needs it."""
    from scipy.signal import lfilter as scipy_lfilter

    return scipy_lfilter(b, a, x)
