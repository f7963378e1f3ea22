"""A paralinguistic corpus with many speakers: three arousal levels carried by prosody and voice quality.

The paper's tasks (emotion, arousal, stress) ask *how* something is said by *whom*; this corpus makes that
question measurable at one client per speaker. Speech comes from eSpeak NG (SSML prosody, nothing downloaded).
Every clip is a fresh random sentence, so the words never carry the class. The three classes ``low``, ``mid``
and ``high`` shift a speaker's own baseline:

* speaking rate (low 0.84x, high 1.18x), pitch level (-9 % / +11 %) and pitch range (0.6x / 1.7x);
* loudness over the speaker's fixed background noise, i.e. the SNR the image shows after peak normalisation
  (-6 dB / +6 dB);
* spectral tilt (darker / brighter voice) and the pause between the sentence's two phrases (longer / shorter).

Each speaker's baseline (voice, accent, pitch, range, rate, tilt, pause, noise level and colour) is drawn as
widely as the class shifts, so no absolute cue separates the classes across speakers, and every clip jitters
each cue: a small CNN learns the task well above chance, and far from perfectly. Speakers are assigned whole to
train / devel / test (about 60 / 20 / 20 %). Deterministic per seed with the same eSpeak NG; speakers are
synthesised in parallel processes (the result does not depend on how many).

Written like the other corpora: ``DIR/audio/<speaker>/<class>_<k>.wav`` (16 kHz, 16-bit) and ``DIR/manifest.csv``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsl_fed.data.corpus_folder import corpus_folder
from dsl_fed.data.demo import SAMPLE_RATE, assign_partitions, lfilter, write_manifest, write_wav
from dsl_fed.data.speech import ACCENTS, VARIANTS, espeak_executable, synthesise
from dsl_fed.errors import DslFedError

LEVELS: tuple[str, ...] = ("high", "low", "mid")  # sorted: the manifest's class order
MAX_SPEAKERS = 5000
SNR = (24.0, 40.0)  # dB, speech peak over background noise RMS: a quiet room with a headset microphone
# Class shifts around a speaker's baseline: rate factor, pitch %, range factor, SNR dB, tilt, pause factor.
_SHIFT = {
    "low": (0.84, -9.0, 0.6, -6.0, -0.35, 1.6),
    "mid": (1.0, 0.0, 1.0, 0.0, 0.0, 1.0),
    "high": (1.18, 11.0, 1.7, 6.0, 0.35, 0.6),
}
_WORDS = {
    "adj": ("old", "quiet", "small", "green", "distant", "heavy", "narrow", "bright", "wooden", "empty", "northern",
            "careful", "broken", "silver", "gentle", "crowded"),
    "noun": ("lighthouse", "garden", "teacher", "river", "market", "station", "letter", "window", "farmer",
             "village", "bridge", "doctor", "kitchen", "harbour", "painter", "engine"),
    "verb": ("opened", "crossed", "visited", "painted", "repaired", "followed", "carried", "watched", "counted",
             "cleaned", "passed", "reached"),
    "tail": ("before the evening", "near the old road", "on a cold morning", "after the long winter",
             "behind the station", "along the shore", "in the afternoon", "without a word", "every single day",
             "at the end of the week"),
}


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker's baseline."""

    voice: str  # eSpeak voice, e.g. "en-gb+f3"
    pitch: float  # SSML pitch offset, %
    range: float  # SSML pitch range, %
    rate: float  # SSML rate, %
    tilt: float  # one-pole spectral tilt: > 0 brighter, < 0 darker
    pause_ms: float  # pause between the clip's two phrases
    snr_db: float  # speech peak over the background noise RMS
    noise_colour: float  # one-pole low-pass coefficient of the noise (0 = white)


def make_arousal_corpus(out_dir: str | Path, speakers: int = 60, clips: int = 4, seed: int = 0,
                        progress: bool = True, jobs: int | None = None, snr: tuple[float, float] = SNR) -> Path:
    """Write the arousal corpus and return ``out_dir/manifest.csv``.

    Args:
        out_dir: Target folder.
        speakers: Number of speakers (3-`MAX_SPEAKERS`).
        clips: Clips per arousal level per speaker.
        seed: Voices, sentences, noise and partitions are a deterministic function of the arguments.
        progress: tqdm bar on stderr (only on a terminal).
        jobs: Synthesis processes (None = one per CPU); the files do not depend on it.
        snr: Range of the speakers' recording SNR in dB (speech peak over noise RMS); (100, 140) is a studio
            whose noise lies below the 16-bit quantisation step, so pauses are digital silence.
    """
    if not 3 <= speakers <= MAX_SPEAKERS:
        raise DslFedError(f"--speakers must be in [3, {MAX_SPEAKERS}] (one each for train, devel and test at least), "
                          f"got {speakers}")
    if not 1 <= clips <= 1000:
        raise DslFedError(f"--clips must be in [1, 1000] (clips per class per speaker), got {clips}")
    if not 0 <= seed < 2 ** 32:
        raise DslFedError(f"--seed must be in [0, 2^32), got {seed}")
    if not 0 <= snr[0] <= snr[1] <= 200:
        raise DslFedError(f"--snr must be LOW,HIGH dB with 0 <= LOW <= HIGH <= 200, got {snr[0]:g},{snr[1]:g}")
    espeak = espeak_executable()
    out_dir = Path(out_dir)
    names = [f"spk{k + 1:04d}" for k in range(speakers)]
    partition = assign_partitions(names, seed)
    rows: list[tuple[str, str, str, str]] = []
    bar = tqdm(total=speakers, desc="synthesising arousal corpus", unit="speaker",
               disable=None if progress else True, file=sys.stderr, leave=False)
    workers = max(1, min(jobs or os.cpu_count() or 1, speakers))
    with corpus_folder(out_dir) as folder, bar, \
            ProcessPoolExecutor(workers, initializer=_die_with, initargs=(os.getpid(),)) as pool:
        tasks = [(espeak, folder, name, k, clips, seed, snr) for k, name in enumerate(names)]
        for name, speaker_rows in zip(names, pool.map(_write_speaker, tasks, chunksize=4)):
            rows += [(rel, label, name, partition[name]) for rel, label in speaker_rows]
            bar.update()
        write_manifest(folder, rows)
    return out_dir / "manifest.csv"


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Pool initializer: the kernel kills this worker when the process that forked it dies, even by SIGKILL.

    A forked worker is invisible to the run's watchdog (its /proc environ is the parent's from before the run
    mark was set), so it must not outlive the command by itself. (Spawned workers would carry the mark, but
    spawning starts multiprocessing's resource tracker, which then outlives the corpus as a stray child.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def draw_speaker(rng: np.random.Generator, snr: tuple[float, float] = SNR) -> Speaker:
    """A speaker's baseline, spread as widely as the class shifts so that they overlap across speakers."""
    return Speaker(
        voice=f"{ACCENTS[rng.integers(len(ACCENTS))]}+{VARIANTS[rng.integers(len(VARIANTS))]}",
        pitch=float(rng.uniform(-25.0, 25.0)),
        range=float(rng.uniform(60.0, 170.0)),
        rate=float(rng.uniform(82.0, 122.0)),
        tilt=float(rng.uniform(-0.4, 0.4)),
        pause_ms=float(rng.uniform(150.0, 600.0)),
        snr_db=float(rng.uniform(*snr)),
        noise_colour=float(rng.uniform(0.0, 0.9)),
    )


def speaker_baseline(index: int, seed: int = 0, snr: tuple[float, float] = SNR) -> Speaker:
    """The baseline of speaker `index` (0-based: ``spk{index + 1:04d}``) in the corpus made with `seed` and `snr`.

    Exactly the draw the generator synthesises from, so analyses can use a speaker's voice (pitch level, voice
    variant, ...) as ground truth without a side file.
    """
    return draw_speaker(np.random.default_rng([seed, index, 0xA205]), snr)


def sentence(rng: np.random.Generator) -> tuple[str, str]:
    """A random, class-independent sentence in two phrases."""
    pick = {key: words[rng.integers(len(words))] for key, words in _WORDS.items()}
    return f"The {pick['adj']} {pick['noun']} {pick['verb']}", f"{pick['tail']}."


def ssml(speaker: Speaker, level: str, rng: np.random.Generator) -> tuple[str, float, float]:
    """SSML for one clip of `level` (one sentence, a pause between its phrases) plus its tilt and SNR in dB."""
    rate_f, pitch_d, range_f, snr_d, tilt_d, pause_f = _SHIFT[level]
    rate = speaker.rate * rate_f * rng.uniform(0.93, 1.07)
    pitch = speaker.pitch + pitch_d + rng.uniform(-4.0, 4.0)
    span = speaker.range * range_f * rng.uniform(0.85, 1.15)
    pause = speaker.pause_ms * pause_f * rng.uniform(0.7, 1.3)
    first, second = sentence(rng)
    text = (f'<speak><prosody rate="{rate:.0f}%" pitch="{pitch:+.0f}%" range="{span:.0f}%">{first}'
            f'<break time="{pause:.0f}ms"/>{second}</prosody></speak>')
    tilt = float(np.clip(speaker.tilt + tilt_d + rng.uniform(-0.1, 0.1), -0.85, 0.85))
    return text, tilt, speaker.snr_db + snr_d + rng.uniform(-2.0, 2.0)


def record_clip(espeak: str, speaker: Speaker, level: str, rng: np.random.Generator) -> np.ndarray:
    """One clip: a sentence at `level`, tilted, over the speaker's background noise at the clip's SNR."""
    text, tilt, snr_db = ssml(speaker, level, rng)
    speech = synthesise(espeak, text, speaker.voice, ssml=True)
    # tilt > 0: pre-emphasis (brighter, tense voice); tilt < 0: one-pole low-pass (darker, lax voice)
    speech = lfilter([1.0, -tilt], [1.0], speech) if tilt > 0 else lfilter([1.0 + tilt], [1.0, tilt], speech)
    lead = int(rng.uniform(0.05, 0.25) * SAMPLE_RATE)
    clip = np.zeros(speech.size + lead + int(0.1 * SAMPLE_RATE))
    clip[lead:lead + speech.size] = 0.8 * speech / max(1e-9, np.abs(speech).max())
    noise = lfilter([1.0], [1.0, -speaker.noise_colour], rng.standard_normal(clip.size))
    noise *= 0.8 * 10 ** (-snr_db / 20) / max(1e-9, np.sqrt(np.mean(noise ** 2)))
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)


def _write_speaker(task: tuple) -> list[tuple[str, str]]:
    espeak, out_dir, name, k, clips, seed, snr = task
    speaker = speaker_baseline(k, seed, snr)
    rows = []
    for c, level in enumerate(LEVELS):
        for j in range(clips):
            audio = record_clip(espeak, speaker, level, np.random.default_rng([seed, k, c, j, 0xA205]))
            rel = f"audio/{name}/{level}_{j:02d}.wav"
            write_wav(out_dir / rel, audio)
            rows.append((rel, level))
    return rows
