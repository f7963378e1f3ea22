"""`dsl_fed make-demo-data` and `dsl_fed data-stats`: create the offline demo corpus; inspect any corpus.

`data-stats` decodes every clip once, so it doubles as a validator: a broken file or manifest row fails here,
with the same one-line message, before any training starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from dsl_fed.cli.arguments import int_in, seed, snr_range
from dsl_fed.config import load_config
from dsl_fed.data.arousal import LEVELS, MAX_SPEAKERS, SNR, make_arousal_corpus
from dsl_fed.data.audio import MIN_SECONDS, load_audio
from dsl_fed.data.chunking import count_chunks
from dsl_fed.data.demo import CLASSES, make_demo_corpus
from dsl_fed.data.manifest import PARTITIONS, load_manifest, read_manifest
from dsl_fed.data.speech import WORDS, make_speech_corpus
from dsl_fed.data.partition import partition_speakers
from dsl_fed.federated.watchdog import guard_children

MAX_ROWS = 50  # rows per table before the rest is summarised


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "make-demo-data",
        help="write the synthetic demo corpus (wav files + manifest.csv)",
        description="Synthesise a small speaker-structured corpus (3 intonation classes: "
        f"{', '.join(CLASSES)}) with speaker-independent train/devel/test partitions. Deterministic by seed.",
    )
    demo.add_argument("directory", metavar="DIR", type=Path, help="output folder (manifest at DIR/manifest.csv)")
    demo.add_argument("--speakers", type=int_in(3, 1000), default=10, metavar="N",
                      help="speakers, 3-1000 (default 10: 6 train / 2 devel / 2 test)")
    demo.add_argument("--clips", type=int_in(1, 1000), default=6, metavar="K",
                      help="clips per class per speaker, 1-1000 (default 6)")
    demo.add_argument("--seed", type=seed, default=0, metavar="S", help="random seed (default 0)")
    demo.set_defaults(func=run_make_demo_data)

    speech = subparsers.add_parser(
        "make-speech-data",
        help="write a speech corpus synthesised with espeak-ng: keywords or arousal (wav files + manifest.csv)",
        description="Synthesise a speaker-structured corpus with eSpeak NG, with speaker-independent "
        f"train/devel/test partitions. --task commands: 5 spoken words ({', '.join(WORDS)}), each speaker a voice, "
        f"accent, pitch, rate and microphone. --task arousal: 3 arousal levels ({', '.join(LEVELS)}) carried by "
        "rate, pitch level and range, loudness, spectral tilt and pauses around each speaker's own baseline, a "
        "random sentence per clip (a paralinguistic task like the paper's). Needs the espeak-ng program. "
        "Deterministic by seed.",
    )
    speech.add_argument("directory", metavar="DIR", type=Path, help="output folder (manifest at DIR/manifest.csv)")
    speech.add_argument("--task", choices=("commands", "arousal"), default="commands",
                        help="what the classes are (default commands)")
    speech.add_argument("--speakers", type=int_in(3, MAX_SPEAKERS), default=None, metavar="N",
                        help="speakers (commands: 3-40, default 12 = 8 train / 2 devel / 2 test; arousal: "
                        f"3-{MAX_SPEAKERS}, default 60 = 36 / 12 / 12)")
    speech.add_argument("--clips", type=int_in(1, 1000), default=None, metavar="K",
                        help="clips per class per speaker, 1-1000 (default: commands 6, arousal 4)")
    speech.add_argument("--seed", type=seed, default=0, metavar="S", help="random seed (default 0)")
    speech.add_argument("--snr", type=snr_range, default=SNR, metavar="LOW,HIGH",
                        help=f"arousal: range of the speakers' recording SNR in dB (default {SNR[0]:g},{SNR[1]:g}; "
                        "100,140 = studio recordings whose pauses are digital silence)")
    speech.set_defaults(func=run_make_speech_data)

    stats = subparsers.add_parser(
        "data-stats",
        help="clips, chunks and seconds per partition, class, speaker and federated shard",
        description="Read the config's manifest, decode every clip once and print clips, chunks and seconds "
        "per partition, class, speaker and federated shard as tables.",
    )
    stats.add_argument("config", metavar="CONFIG", type=Path, help="YAML config (its data section is used)")
    stats.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.chunk_seconds=1.0")
    stats.set_defaults(func=run_data_stats)


def run_make_demo_data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest_path = make_demo_corpus(args.directory, speakers=args.speakers, clips=args.clips, seed=args.seed)
    _report_corpus(manifest_path, args.speakers, start)
    return 0


def run_make_speech_data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    make, speakers, clips = ((make_arousal_corpus, 60, 4) if args.task == "arousal" else (make_speech_corpus, 12, 6))
    speakers = speakers if args.speakers is None else args.speakers
    clips = clips if args.clips is None else args.clips
    extra = {"snr": args.snr} if args.task == "arousal" else {}
    with guard_children():  # espeak-ng ends with this command, even on SIGKILL (the workers: arousal.py)
        manifest_path = make(args.directory, speakers=speakers, clips=clips, seed=args.seed, **extra)
    _report_corpus(manifest_path, speakers, start)
    return 0


def _report_corpus(manifest_path: Path, speakers: int, start: float) -> None:
    manifest = read_manifest(manifest_path)
    counts = ", ".join(f"{len(manifest.speakers(p))} {p}" for p in PARTITIONS)
    print(
        f"wrote {len(manifest.clips)} clips ({speakers} speakers: {counts}; classes {', '.join(manifest.classes)}) "
        f"in {time.perf_counter() - start:.1f} s\nmanifest: {manifest_path}"
    )


def run_data_stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    manifest = load_manifest(data)

    # (clips, chunks, seconds) per key
    totals: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    short: list[str] = []
    with tqdm(manifest.clips, desc="reading audio", unit="file", disable=None, file=sys.stderr, leave=False) as bar:
        for clip in bar:
            samples = load_audio(clip.path, data.sample_rate).shape[0]
            chunks = count_chunks(samples, data.chunk_samples, data.hop_samples)
            seconds = samples / data.sample_rate
            if seconds < MIN_SECONDS:
                short.append(str(clip.path))
            for key in (
                ("partition", clip.partition),
                ("total",),
                ("class", clip.label, clip.partition),
                ("speaker", clip.speaker, clip.partition),
            ):
                entry = totals[key]
                entry[0] += 1
                entry[1] += chunks
                entry[2] += seconds

    def cells(key: tuple[str, ...]) -> list[str]:
        clips, chunks, seconds = totals.get(key, [0, 0, 0.0])
        return [str(int(clips)), str(int(chunks)), f"{seconds:.1f}"]

    present = [p for p in PARTITIONS if ("partition", p) in totals]
    print(f"manifest: {manifest.source}")
    print(
        f"{len(manifest.clips)} clips, {len(manifest.speakers())} speakers, {len(manifest.classes)} classes "
        f"({', '.join(manifest.classes)}); chunks of {data.chunk_seconds:g} s, hop {data.hop_seconds:g} s "
        f"at {data.sample_rate} Hz"
    )
    print()
    rows = [[p, str(len(manifest.speakers(p)))] + cells(("partition", p)) for p in present]
    rows.append(["total", str(len(manifest.speakers()))] + cells(("total",)))
    print(format_table(["partition", "speakers", "clips", "chunks", "seconds"], rows))
    print()
    rows = [[label, p] + cells(("class", label, p)) for label in manifest.classes for p in present]
    print(format_table(["class", "partition", "clips", "chunks", "seconds"], rows))
    print()
    speakers = sorted({(c.partition, c.speaker) for c in manifest.clips}, key=lambda ps: (PARTITIONS.index(ps[0]), ps[1]))
    rows = [[s, p] + cells(("speaker", s, p)) for p, s in speakers]
    print(format_table(["speaker", "partition", "clips", "chunks", "seconds"], _cap(rows, "speakers")))
    print()
    shards = partition_speakers(manifest.speakers("train"), data.shards, data.seed)
    rows = []
    for k, group in enumerate(shards):
        summed = [sum(totals[("speaker", s, "train")][i] for s in group) for i in range(3)]
        rows.append([str(k), str(len(group)), str(int(summed[0])), str(int(summed[1])), f"{summed[2]:.1f}", _names(group)])
    title = f"federated shards (data.shards={data.shards}: {'one per speaker' if data.shards == 0 else 'speaker groups'})"
    print(title)
    print(format_table(["shard", "speakers", "clips", "chunks", "seconds", "members"], _cap(rows, "shards")))
    warnings = list(manifest.warnings)
    if short:
        warnings.append(f"{len(short)} clip(s) shorter than {1000 * MIN_SECONDS:g} ms, probably broken (e.g. {short[0]})")
    for warning in warnings:
        print(f"\nWARNING: {warning}")
    manifest.partition("devel", required=True)  # train and simulate select on devel: an error here too
    return 0


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Align columns: text left, numbers right (empty cells ignored), two spaces apart."""
    numeric = [any(r[i] for r in rows) and all(_is_number(r[i]) for r in rows if r[i]) for i in range(len(headers))]
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _cap(rows: list[list[str]], what: str, limit: int = MAX_ROWS) -> list[list[str]]:
    """Keep long tables readable (a corpus without speaker ids has one speaker per clip)."""
    if len(rows) <= limit:
        return rows
    return rows[:limit] + [[f"... ({len(rows) - limit} more {what})"] + [""] * (len(rows[0]) - 1)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _names(group: list[str], limit: int = 6) -> str:
    return ", ".join(group) if len(group) <= limit else ", ".join(group[:limit]) + f", ... (+{len(group) - limit})"
