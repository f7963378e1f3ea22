"""A second offline corpus made of real synthesised speech: spoken command words, speaker-structured.

The demo corpus (`dsl_fed.data.demo`) asks *how* something is said (intonation); this one asks *what* is
said: five command words (`WORDS`: down, go, left, stop, up), a keyword-spotting task
the demo generator cannot produce. Speech comes from the eSpeak NG formant synthesiser (``apt-get install
espeak-ng``; nothing is downloaded at run time). A speaker is one eSpeak voice variant with its own pitch,
pitch range, speaking rate, English accent and microphone (level, background-noise level and colour), so
speakers differ in timbre, tempo and accent, and are assigned whole to train / devel / test. Within a
speaker every clip varies too: the word is spoken as a statement, question, exclamation or trailing off
(eSpeak changes its intonation and length), with small changes of pitch and rate, at a random position in a
1 s clip (longer only if the word is), over fresh background noise. No carrier words: with chunk-level training labels, a chunk
holding only "please" would teach noise.

Deterministic by seed (same eSpeak NG version, same files). Written like the demo corpus:
``DIR/audio/<speaker>/<word>_<k>.wav`` (16 kHz, 16-bit) and ``DIR/manifest.csv``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from dsl_fed.data.corpus_folder import corpus_folder
from dsl_fed.data.demo import SAMPLE_RATE, assign_partitions, lfilter, write_manifest, write_wav
from dsl_fed.errors import DslFedError

WORDS: tuple[str, ...] = ("down", "go", "left", "stop", "up")
VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
                             "klatt2", "klatt3", "croak", "whisper", "grandpa", "steph", "andrea")
ACCENTS: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbcwmd")
STYLES: tuple[str, ...] = ("{w}", "{w}.", "{w}?", "{w}!", "{w}...")  # statement, question, exclamation, trailing off
ESPEAK_RATE = 22050


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an eSpeak voice and a recording setup."""

    voice: str  # e.g. "en-gb+f3"
    pitch: int  # eSpeak -p, 0-99
    rate: int  # words per minute, eSpeak -s
    gain: float
    noise_db: float  # background noise level relative to full scale
    noise_colour: float  # 0 white ... 0.9 strongly low-pass


def make_speech_corpus(out_dir: str | Path, speakers: int = 12, clips: int = 6, seed: int = 0,
                       progress: bool = True) -> Path:
    """Write the spoken-command corpus and return ``out_dir/manifest.csv``.

    Args:
        out_dir: Target folder: new, empty, or an earlier corpus this tool wrote (`dsl_fed.data.corpus_folder`).
        speakers: Number of speakers (3-40); about 20 % devel, 20 % test, the rest train (12 -> 8 / 2 / 2).
        clips: Clips per word per speaker.
        seed: Voices, phrases, noise and partitions are a deterministic function of the arguments.
        progress: tqdm bar on stderr (only on a terminal).
    """
    if not 3 <= speakers <= 40:
        raise DslFedError(f"--speakers must be in [3, 40] (one each for train, devel and test at least), got {speakers}")
    if clips < 1:
        raise DslFedError(f"--clips must be >= 1 (clips per word per speaker), got {clips}")
    if seed < 0:
        raise DslFedError(f"--seed must be >= 0, got {seed}")
    espeak = espeak_executable()
    out_dir = Path(out_dir)
    names = [f"tts{k + 1:02d}" for k in range(speakers)]
    partition = assign_partitions(names, seed)
    variants = np.random.default_rng([seed, 0x5EEC]).permutation(len(VARIANTS))
    rows: list[tuple[str, str, str, str]] = []
    bar = tqdm(total=speakers * len(WORDS) * clips, desc="synthesising speech corpus", unit="clip",
               disable=None if progress else True, file=sys.stderr, leave=False)
    with corpus_folder(out_dir) as folder, bar:
        for k, name in enumerate(names):
            speaker = _draw_speaker(np.random.default_rng([seed, k, 0x5EEC]), VARIANTS[variants[k % len(VARIANTS)]])
            for c, word in enumerate(WORDS):
                for j in range(clips):
                    rng = np.random.default_rng([seed, k, c, j, 2])
                    audio = record_clip(espeak, speaker, word, rng)
                    rel = f"audio/{name}/{word}_{j:02d}.wav"
                    write_wav(folder / rel, audio)
                    rows.append((rel, word, name, partition[name]))
                    bar.update()
        write_manifest(folder, rows)
    return out_dir / "manifest.csv"


def record_clip(espeak: str, speaker: Speaker, word: str, rng: np.random.Generator) -> np.ndarray:
    """One clip: the word in a random speaking style, placed at random in 1 s of background noise."""
    phrase = STYLES[rng.integers(len(STYLES))].format(w=word)
    pitch = int(np.clip(speaker.pitch + rng.integers(-8, 9), 0, 99))
    rate = int(speaker.rate * rng.uniform(0.9, 1.1))
    speech = synthesise(espeak, phrase, speaker.voice, pitch, rate)
    n = max(SAMPLE_RATE, speech.size + SAMPLE_RATE // 20)
    clip = np.zeros(n, dtype=np.float64)
    start = rng.integers(0, n - speech.size + 1)
    clip[start:start + speech.size] = speaker.gain * speech / max(1e-9, np.abs(speech).max())
    noise = lfilter([1.0], [1.0, -speaker.noise_colour], rng.standard_normal(n))
    noise *= 10 ** (speaker.noise_db / 20) / max(1e-9, np.sqrt(np.mean(noise ** 2)))
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)


def synthesise(espeak: str, text: str, voice: str, pitch: int | None = None, rate: int | None = None,
               ssml: bool = False) -> np.ndarray:
    """eSpeak NG speech for `text` (SSML if `ssml`) as float samples at 16 kHz (eSpeak writes 22.05 kHz;
    resampled exactly); `pitch` (0-99) and `rate` (words per minute) are eSpeak's own, None = the voice's."""
    cmd = [espeak, "-v", voice, *(["-m"] if ssml else []), *(["-p", str(pitch)] if pitch is not None else []),
           *(["-s", str(rate)] if rate is not None else []), "--stdout", text]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        raise DslFedError(f"espeak-ng failed for voice {voice!r}: {done.stderr.decode(errors='replace').strip()[:200]}")
    audio, rate_in = sf.read(io.BytesIO(done.stdout), dtype="float64")
    if rate_in != ESPEAK_RATE:
        raise DslFedError(f"espeak-ng wrote {rate_in} Hz audio, expected {ESPEAK_RATE}")
    trimmed = np.flatnonzero(np.abs(audio) > 1e-3)
    audio = audio[trimmed[0]:trimmed[-1] + 1] if trimmed.size else audio
    from scipy.signal import resample_poly  # on first use: scipy.signal takes seconds to import (every dsl_fed command)

    return resample_poly(audio, 320, 441)  # 22050 * 320 / 441 = 16000


def espeak_executable() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise DslFedError("espeak-ng not found on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)")
    return found


def _draw_speaker(rng: np.random.Generator, variant: str) -> Speaker:
    return Speaker(
        voice=f"{ACCENTS[rng.integers(len(ACCENTS))]}+{variant}",
        pitch=int(rng.integers(15, 85)),
        rate=int(rng.integers(100, 170)),
        gain=float(rng.uniform(0.3, 0.9)),
        noise_db=float(rng.uniform(-50.0, -30.0)),
        noise_colour=float(rng.uniform(0.0, 0.9)),
    )
