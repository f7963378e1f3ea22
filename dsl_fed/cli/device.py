"""`dsl_fed export`, `dsl_fed predict` and `dsl_fed stats`: from a trained Keras model to a device.

- ``export MODEL.keras``: TFLite file + ``manifest.json`` in a folder of its own (default
  ``<model folder>/tflite_<precision>/``), then a parity check against Keras. With ``--trainable``: the trainable
  file (`dsl_fed.trainable_export`) in ``<model folder>/tflite_trainable/``.
- ``predict MODEL.tflite AUDIO_OR_DIR``: per-chunk probabilities and the clip decision with LiteRT only (no
  TensorFlow), optionally as a replayed live stream.
- ``stats MODEL``: the paper's Table 4 for this machine, written beside the model.

The training configuration and class names of a ``.keras`` file are found automatically: ``--config`` or
the ``config.yaml`` of its run folder (the model's folder or the one above, e.g. ``runs/x/checkpoints/``);
``--classes``, or the ``classes`` of the run's ``metrics.json``, or those of the config's data manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.cli.arguments import int_in, threads
from dsl_fed.text import check_visible
from dsl_fed.errors import DslFedError
from dsl_fed.export import PARITY_THRESHOLDS
from dsl_fed.precision import QUANT_LABELS

VERIFY_CHUNKS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a trained .keras model to TFLite (raw audio in, probabilities out) + manifest.json",
        description="Convert a trained .keras model to a builtins-only TFLite file that takes a raw 16 kHz waveform "
        "chunk, write manifest.json beside it and check it against the Keras model.",
    )
    p.add_argument("model", type=Path, help="trained model (.keras)")
    p.add_argument("--quantization", choices=list(QUANT_LABELS), default="none",
                   help="none = float32; float16 weights; dynamic-range int8 weights; int8 = full-integer classifier "
                   "calibrated on training chunks (default: none)")
    p.add_argument("--input", choices=["audio", "image"], default="audio",
                   help="audio: raw waveform in, spectrogram inside (default); image: backbone + head only")
    p.add_argument("--trainable", action="store_true",
                   help="write the trainable model instead: signatures embed, train, infer, parameters, restore "
                   "(float32; the head trains on the device with LiteRT alone)")
    p.add_argument("--out", type=Path, default=None,
                   help="output .tflite (default: <model folder>/tflite_<precision>/model.tflite, "
                   "with --trainable <model folder>/tflite_trainable/model.tflite)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="minimum top-1 agreement with Keras on the check chunks, 0-1 (default per precision: "
                   + ", ".join(f"{q} {a:g}" for q, (a, _) in PARITY_THRESHOLDS.items()) + ")")
    p.add_argument("--max-prob-diff", type=float, default=None, metavar="P",
                   help="maximum |p_tflite - p_keras| of any class probability (default per precision: "
                   + ", ".join(f"{q} {d:g}" for q, (_, d) in PARITY_THRESHOLDS.items()) + ")")
    _context_arguments(p)
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "predict",
        help="predict audio files with an exported .tflite model (LiteRT, no TensorFlow)",
        description="Per-chunk class probabilities and the clip decision (mean of chunk probabilities) for an audio "
        "file or every audio file under a folder. Needs manifest.json beside the model.",
    )
    p.add_argument("model", type=Path, help="exported model (.tflite, with manifest.json beside it)")
    p.add_argument("audio", type=Path, help="audio file or folder (searched recursively)")
    p.add_argument("--stream", action="store_true",
                   help="replay each file as a live microphone stream: ring buffer, one prediction per hop")
    p.add_argument("--realtime", action="store_true", help="with --stream: release audio at recording pace")
    p.add_argument("--block", type=int_in(1, 1 << 24), default=None,
                   help="with --stream: samples per microphone block (default: one hop)")
    p.add_argument("--threads", type=threads, default=2, help="LiteRT CPU threads, at most 4 per CPU (default: 2)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default: table)")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser(
        "stats",
        help="Table-4 statistics: params, FLOPs, size, latency, memory of the Keras model and its TFLite exports",
        description="Measure preprocessing alone, the Keras model and its TFLite fp32/fp16/dynamic/int8 exports "
        "(batch 1); print a markdown table and write it beside the model as <stem>_stats.md. "
        "A .tflite MODEL gives its single row.",
    )
    p.add_argument("model", type=Path, help="trained model (.keras) or an exported .tflite")
    p.add_argument("--threads", type=threads, default=2, help="CPU threads for every row, at most 4 per CPU (default: 2)")
    p.add_argument("--runs", type=int_in(1, 100_000), default=50, help="timed runs per row (default: 50)")
    p.add_argument("--repeats", type=int_in(1, 1000), default=1,
                   help="interleaved measurement rounds; the best (lowest median) is kept (default: 1)")
    p.add_argument("--keep-exports", type=Path, default=None, metavar="DIR",
                   help="keep the TFLite files made for the table in DIR, a new or empty folder (default: temporary)")
    _context_arguments(p)
    p.set_defaults(func=run_stats)


def _context_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="training config YAML (default: config.yaml of the model's run folder)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names in output order (default: from the config's data manifest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable")


# --------------------------------------------------------------------------------------------- export


def run_export(args: argparse.Namespace) -> int:
    from dsl_fed.export import check_export_target
    from dsl_fed.io import run_lock

    if args.min_agreement is not None and not 0.0 <= args.min_agreement <= 1.0:
        raise DslFedError(f"--min-agreement must be between 0 and 1, got {args.min_agreement}")
    if args.max_prob_diff is not None and not 0.0 <= args.max_prob_diff <= 1.0:
        raise DslFedError(f"--max-prob-diff must be between 0 and 1, got {args.max_prob_diff}")
    if args.trainable:
        others = [flag for flag, used in (("--quantization", args.quantization != "none"),
                                          ("--input", args.input != "audio"),
                                          ("--min-agreement", args.min_agreement is not None),
                                          ("--max-prob-diff", args.max_prob_diff is not None)) if used]
        if others:
            raise DslFedError(f"--trainable exports a float32 audio-input model; drop {', '.join(others)}")
    folder = "tflite_trainable" if args.trainable else f"tflite_{QUANT_LABELS[args.quantization]}"
    out = args.out or args.model.parent / folder / "model.tflite"
    check_export_target(out, [p for p in (args.model, args.config) if p is not None])
    made = not out.parent.exists()
    try:
        with run_lock(out, what="export"):  # two exports to one folder would mix model and manifest
            return _export_trainable(args, out) if args.trainable else _export(args, out)
    except BaseException:
        if made:  # a failed export leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.parent.rmdir()
        raise


def _export(args: argparse.Namespace, out: Path) -> int:
    from dsl_fed.models import load_model
    from dsl_fed.export import ParityCheck, export_tflite, read_export_manifest, synthetic_chunks

    model = load_model(args.model)
    cfg, classes = _model_context(args.model, args.config, args.classes, args.overrides, model)
    representative = None
    if args.quantization == "int8":
        representative = _chunks(cfg, classes, "train", required=True, purpose="int8 calibration")
    devel = _chunks(cfg, classes, "devel", required=False, purpose="verification", max_clips=16)
    if devel is not None:
        samples, source = _spread(devel.waveforms, VERIFY_CHUNKS), "devel chunks"
    elif representative is not None:
        samples, source = _spread(representative.waveforms, VERIFY_CHUNKS), "train chunks"
    else:  # no audio at hand: still a numerical parity check, just not on recorded sound
        samples = synthetic_chunks(VERIFY_CHUNKS, int(model.input_shape[-1]), cfg.data.sample_rate)
        source = "synthetic chunks (tones and noise; no devel or train audio found)"
    _check_finite(args.model, "the Keras model", model.predict(samples, verbose=0))  # a diverged model: say so
    check = ParityCheck(samples, source, args.min_agreement, args.max_prob_diff)
    path = export_tflite(model, out, args.quantization, args.input, representative=representative,
                         classes=classes, cfg=cfg, check=check)
    parity = read_export_manifest(path).extra["parity"]
    size = path.stat().st_size
    print(f"exported {path} ({size / 1e6:.2f} MB, {args.quantization}, input {args.input}) + {path.parent / 'manifest.json'}")
    print(f"verified on {parity['num_samples']} {source}: max |p_tflite - p_keras| = {parity['max_abs_diff']:.2e} "
          f"(allowed {parity['max_prob_diff']:g}), top-1 agreement {100 * parity['top1_agreement']:.1f} % "
          f"(required {100 * parity['min_agreement']:.1f} %)")
    return 0


def _export_trainable(args: argparse.Namespace, out: Path) -> int:
    from dsl_fed.models import load_model
    from dsl_fed.trainable_export import export_trainable, head_parts

    model = load_model(args.model)
    head_parts(model)  # a model without the paper's head: say so before looking for its config
    cfg, classes = _model_context(args.model, args.config, args.classes, args.overrides, model)
    path = export_trainable(model, out, classes=classes, cfg=cfg)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB, trainable: {', '.join(manifest['signatures'])}; "
          f"optimizer {manifest['optimizer']['name']}) + {path.parent / 'manifest.json'}")
    print(f"verified infer(embed(x)) on {manifest['parity']['source']}: max |p_litert - p_keras| = "
          f"{manifest['parity']['max_abs_diff']:.2e} (allowed {manifest['parity']['limit']:g})")
    return 0


def _check_finite(model_path: Path, what: str, outputs: np.ndarray) -> None:
    """A model that diverged (NaN/inf weights) gives non-finite probabilities: refuse to export or trust it."""
    if not np.isfinite(outputs).all():
        raise DslFedError(f"{model_path}: {what} gives non-finite outputs (NaN/inf), so its training diverged; "
                          "use an earlier checkpoint")


def _model_context(model_path: Path, config: Path | None, classes_arg: str | None, overrides: list[str],
                   model: Any) -> tuple[Any, list[str]]:
    """The training config and class names of a saved model (see the module docstring)."""
    from dsl_fed.config import load_config

    run_dirs = [model_path.parent, model_path.parent.parent]
    if config is None:
        config = next((d / "config.yaml" for d in run_dirs if (d / "config.yaml").is_file()), None)
        if config is None:
            raise DslFedError(f"{model_path}: no config.yaml in its run folder; pass --config (the training config)")
    cfg = load_config(config, overrides)
    samples = int(model.input_shape[-1])
    if cfg.data.chunk_samples != samples:
        raise DslFedError(f"{config}: data.chunk_seconds x data.sample_rate = {cfg.data.chunk_samples} samples, "
                          f"but {model_path} takes {samples}; pass the config the model was trained with")
    if classes_arg:
        classes = [c.strip() for c in classes_arg.split(",") if c.strip()]
        for name in classes:
            check_visible(name, "--classes: class")
    else:
        classes = _run_classes(run_dirs) or _manifest_classes(cfg)
    outputs = int(model.output_shape[-1])
    if len(classes) != outputs:
        raise DslFedError(f"{len(classes)} class names ({', '.join(classes)}) for a model with {outputs} outputs")
    return cfg, classes


def _run_classes(run_dirs: list[Path]) -> list[str] | None:
    """Class names recorded by training in ``metrics.json`` of the run folder, if any."""
    for d in run_dirs:
        path = d / "metrics.json"
        if path.is_file():
            try:
                classes = json.loads(path.read_text()).get("classes")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(classes, list) and classes:
                return [str(c) for c in classes]
    return None


def _manifest_classes(cfg: Any) -> list[str]:
    from dsl_fed.data.manifest import load_manifest

    try:
        return list(load_manifest(cfg.data).classes)
    except DslFedError as exc:
        raise DslFedError(f"cannot find the class names: no metrics.json in the run folder and data.manifest "
                          f"is unreadable ({exc}); pass --classes") from None


def _chunks(cfg: Any, classes: list[str], partition: str, required: bool, purpose: str, max_clips: int = 100) -> Any:
    """Chunks of up to `max_clips` clips (spread over the partition) of the config's corpus, or None if the
    audio is unavailable and not `required`."""
    from dsl_fed.data.manifest import load_manifest
    from dsl_fed.data.pipeline import load_chunks

    try:
        clips = load_manifest(cfg.data).partition(partition)
        if not clips:
            raise DslFedError(f"{cfg.data.manifest}: partition {partition!r} is empty")
        picked = np.linspace(0, len(clips) - 1, min(max_clips, len(clips))).round().astype(int)
        return load_chunks([clips[i] for i in sorted(set(picked))], cfg.data, classes)
    except DslFedError as exc:
        if required:
            raise DslFedError(f"{purpose} needs the {partition} audio of data.manifest: {exc}") from None
        return None


def _spread(x: np.ndarray, n: int) -> np.ndarray:
    """`n` rows spread evenly over `x` (all rows if fewer)."""
    if len(x) <= n:
        return x
    return x[np.linspace(0, len(x) - 1, n).round().astype(int)]


# -------------------------------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    from dsl_fed.data.audio import SUPPORTED_EXTENSIONS
    from dsl_fed.export import manifest_path, read_export_manifest
    from dsl_fed.litert import TFLiteRunner, native_sample_rate, predict_file

    if args.realtime and not args.stream:
        raise DslFedError("--realtime needs --stream")
    if args.block is not None and (not args.stream or args.block < 1):
        raise DslFedError("--block needs --stream and must be >= 1 sample")
    if not args.model.is_file():
        raise DslFedError(f"{args.model}: model file not found")
    manifest = read_export_manifest(args.model)
    if manifest.input != "audio":
        raise DslFedError(f"{args.model}: is an image-input export; predict needs a raw-audio export "
                          "(dsl_fed export --input audio)")
    runner = TFLiteRunner(args.model, threads=args.threads)
    if runner.num_outputs != len(manifest.classes):
        raise DslFedError(f"{manifest_path(args.model)}: lists {len(manifest.classes)} classes "
                          f"({', '.join(manifest.classes)}) but {args.model} has {runner.num_outputs} outputs; "
                          "export the model again (dsl_fed export) so the two belong together")
    files, skipped = _audio_files(args.audio, SUPPORTED_EXTENSIONS)
    out = _Printer(args.format, manifest.classes, args.stream)
    failed = 0
    for path in files:
        try:
            rate = native_sample_rate(path)
            if rate is not None and rate != manifest.sample_rate:
                print(f"note: {path} is {rate} Hz; resampling to {manifest.sample_rate} Hz as the model expects "
                      f"({manifest_path(args.model)})", file=sys.stderr)
            out.begin(path)
            result = predict_file(runner, path, manifest.sample_rate, manifest.window_samples, manifest.hop_samples,
                                  stream=args.stream, realtime=args.realtime, block=args.block,
                                  on_chunk=lambda c: out.chunk(_finite_chunk(args.model, c)))
            out.end(result)
        except DslFedError as exc:
            if args.audio.is_file() or isinstance(exc, _BrokenModel):
                raise
            failed += 1
            out.abort()
            print(f"warning: skipped {exc}", file=sys.stderr)
    out.finish()
    predicted = len(files) - failed
    if args.audio.is_dir():
        print(f"predicted {predicted} file(s) in {args.audio}; skipped {len(skipped)} non-audio file(s), "
              f"{failed} unreadable audio file(s)", file=sys.stderr)
    if predicted == 0:
        raise DslFedError(f"{args.audio}: no audio file could be predicted "
                          f"({len(skipped)} non-audio, {failed} unreadable; audio types: {', '.join(SUPPORTED_EXTENSIONS)})")
    return 0


class _BrokenModel(DslFedError):
    """The model, not the input file, is at fault: stop instead of skipping to the next file."""


def _finite_chunk(model_path: Path, chunk: Any) -> Any:
    try:
        _check_finite(model_path, f"the model (chunk {chunk.index})", chunk.probabilities)
    except DslFedError as exc:
        raise _BrokenModel(str(exc)) from None
    return chunk


def _audio_files(target: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(audio files, skipped non-audio files) of a file or a folder tree; warns about each skipped file."""
    if target.is_file():
        return [target], []  # a single file goes to load_audio, which names any problem precisely
    if not target.exists():
        raise DslFedError(f"{target}: audio file or folder not found")
    if not target.is_dir():
        raise DslFedError(f"{target}: not a regular file or folder (a FIFO, device or socket)")
    audio, skipped = [], []
    for path in sorted(p for p in target.rglob("*") if not p.is_dir()):
        if not path.is_file():  # FIFOs, devices, sockets, dangling links: never opened
            skipped.append(path)
            print(f"warning: skipping {path} (not a regular file)", file=sys.stderr)
        elif path.suffix.lower() in extensions:
            audio.append(path)
        else:
            skipped.append(path)
            print(f"warning: skipping {path} (not an audio file: {path.suffix or 'no extension'})", file=sys.stderr)
    return audio, skipped


class _Printer:
    """Writes predictions as they arrive (table/csv) or collects them (json, printed once at the end)."""

    def __init__(self, fmt: str, classes: tuple[str, ...], stream: bool) -> None:
        self.fmt = fmt
        self.classes = list(classes)
        self.stream = stream
        self.records: list[dict[str, Any]] = []
        self._writer = csv.writer(sys.stdout, lineterminator="\n") if fmt == "csv" else None
        self._path: Path | None = None
        self._header_due = False
        self._csv_header_due = fmt == "csv"
        self._width = max(8, *(len(c) for c in self.classes))

    def begin(self, path: Path) -> None:
        self._path = path
        self._header_due = self.fmt == "table"  # printed with the first chunk: a bad file prints nothing

    def _header(self) -> None:
        mode = "stream, one prediction per hop" if self.stream else "chunks"
        print(f"{self._path} ({mode})")
        cols = "".join(f"{c:>{self._width + 1}}" for c in self.classes)
        print(f"{'chunk':>6}{'start_s':>9}{'end_s':>8}{cols}  {'prediction':<{self._width}}{'latency_ms':>11}")
        self._header_due = False

    def chunk(self, c: Any) -> None:
        label = self.classes[int(np.argmax(c.probabilities))]
        if self._header_due:
            self._header()
        if self.fmt == "table":
            probs = "".join(f"{p:>{self._width + 1}.4f}" for p in c.probabilities)
            print(f"{c.index:>6}{c.start_s:>9.2f}{c.end_s:>8.2f}{probs}  {label:<{self._width}}{c.latency_ms:>11.2f}", flush=True)
        elif self.fmt == "csv":
            if self._csv_header_due:
                self._writer.writerow(["file", "chunk", "start_s", "end_s", *self.classes, "prediction", "latency_ms"])
                self._csv_header_due = False
            self._writer.writerow([self._path, c.index, f"{c.start_s:.3f}", f"{c.end_s:.3f}",
                                   *(f"{p:.6f}" for p in c.probabilities), label, f"{c.latency_ms:.3f}"])
            sys.stdout.flush()

    def end(self, result: Any) -> None:
        label = self.classes[result.decision]
        latencies = [c.latency_ms for c in result.chunks]
        if self.fmt == "table":
            probs = "".join(f"{p:>{self._width + 1}.4f}" for p in result.clip_probabilities)
            print(f"{'clip':>6}{0.0:>9.2f}{result.duration_s:>8.2f}{probs}  {label:<{self._width}}{np.mean(latencies):>11.2f}")
            print(f"decision: {label}  ({len(result.chunks)} chunk(s), mean latency {np.mean(latencies):.2f} ms, "
                  f"max {np.max(latencies):.2f} ms)\n", flush=True)
        elif self.fmt == "csv":
            self._writer.writerow([result.path, "clip", "0.000", f"{result.duration_s:.3f}",
                                   *(f"{p:.6f}" for p in result.clip_probabilities), label, f"{np.mean(latencies):.3f}"])
        else:
            self.records.append({
                "file": str(result.path),
                "duration_s": round(result.duration_s, 4),
                "file_sample_rate": result.file_rate,
                "chunks": [
                    {"index": c.index, "start_s": round(c.start_s, 4), "end_s": round(c.end_s, 4),
                     "probabilities": dict(zip(self.classes, map(float, c.probabilities))),
                     "prediction": self.classes[int(np.argmax(c.probabilities))], "latency_ms": round(c.latency_ms, 3)}
                    for c in result.chunks
                ],
                "clip": {"probabilities": dict(zip(self.classes, map(float, result.clip_probabilities))), "prediction": label},
            })
        self._path = None

    def abort(self) -> None:
        if self.fmt == "table" and self._path is not None and not self._header_due:
            print("(failed)\n")
        self._path = None

    def finish(self) -> None:
        if self.fmt == "json":
            print(json.dumps({"classes": self.classes, "mode": "stream" if self.stream else "chunks",
                              "files": self.records}, indent=2))


# ---------------------------------------------------------------------------------------------- stats


def _is_stats_table(path: Path) -> bool:
    """An earlier table of `dsl_fed stats` (the only existing file beside the model it may replace)."""
    text = path.read_text()
    return text.startswith("### ") and "| model | params | FLOPs |" in text


def run_stats(args: argparse.Namespace) -> int:
    from dsl_fed.io import atomic_write, check_empty_folder, check_output_file
    from dsl_fed.stats import model_stats, stats_path, stats_table, tflite_row

    if args.threads < 1 or args.runs < 1 or args.repeats < 1:
        raise DslFedError("--threads, --runs and --repeats must be >= 1")
    if not args.model.is_file():
        raise DslFedError(f"{args.model}: model file not found")
    check_output_file(stats_path(args.model), [args.model], _is_stats_table, "statistics table")
    if args.keep_exports is not None:
        check_empty_folder(args.keep_exports, "--keep-exports folder")
    if args.model.suffix == ".tflite":
        rows = [tflite_row(args.model, args.threads, args.runs)]
    else:
        from dsl_fed.models import load_model

        model = load_model(args.model)
        cfg, classes = _model_context(args.model, args.config, args.classes, args.overrides, model)
        representative = _chunks(cfg, classes, "train", required=False, purpose="int8 calibration")
        rows = model_stats(args.model, cfg, classes, threads=args.threads, runs=args.runs,
                           representative=representative, work_dir=args.keep_exports, repeats=args.repeats, model=model)
    table = stats_table(rows, args.threads, args.runs, title=f"{args.model.name}: Table 4 analogue", repeats=args.repeats)
    target = atomic_write(stats_path(args.model), table)
    print(table)
    print(f"written to {target}", file=sys.stderr)
    return 0
