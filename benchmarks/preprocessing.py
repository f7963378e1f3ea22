"""Preprocessing benchmark: ms per 3 s chunk for the in-graph SpectrogramImage layer vs a librosa + numpy reference.

    python benchmarks/preprocessing.py            # under a minute on 2 cores
    python benchmarks/preprocessing.py --quick    # smoke run, fewer repetitions (~15 s)

Pipelines (same recipe: 16 kHz, 3 s chunks, Hann 512 / hop 256 centred, 128 Slaney Mel bands, dB floored 80 dB
below each chunk's peak, per-chunk min-max, viridis LUT with linear interpolation, bilinear resize to 224 x 224,
DenseNet "torch" normalisation):

(a) the `SpectrogramImage` layer in a graph-compiled ``tf.function`` (TF intra-op threads = ``--threads``);
(b) the same layer alone in a builtins-only TFLite model run by LiteRT (``num_threads=--threads``, XNNPACK);
(c) the reference: ``librosa.feature.melspectrogram`` (multichannel over the batch) + ``librosa.power_to_db``,
    numpy min-max and LUT interpolation, PIL bilinear resize per channel, numpy normalisation.

Each batch size (1 and 32) times all three pipelines interleaved call by call, so load from other processes
slows them alike; the median call time divided by the batch size is reported, with the speed-up over (c).
Targets (2 cores): <= 1 ms per chunk batched and >= 2x faster than the reference (the paper: 7.1 ms
on a 4-thread i5). The header records the load average (the machine may be shared). Writes
``benchmarks/results/preprocessing.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "preprocessing.md"
SR = 16000
SAMPLES = 3 * SR
BATCHES = (1, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="threads for TF and LiteRT (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"markdown output (default {RESULTS})")
    args = parser.parse_args()

    import keras
    import librosa
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from dsl_fed.io import atomic_write
    from dsl_fed.spectrogram import SpectrogramImage

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    load_before = os.getloadavg()

    layer = SpectrogramImage(preprocess="torch")
    graph_fn = tf.function(layer, input_signature=[tf.TensorSpec([None, SAMPLES], tf.float32)])
    tflite_bytes = _convert(keras, tf, layer)
    reference = Reference(layer, librosa)

    waves = _signals(max(BATCHES), librosa)
    repetitions = {1: 20, 32: 4} if args.quick else {1: 300, 32: 40}
    rows, agreement = [], {}
    for batch in BATCHES:
        x = waves[:batch]
        interpreter = Interpreter(model_content=tflite_bytes, num_threads=args.threads)
        interpreter.resize_tensor_input(0, [batch, SAMPLES])
        interpreter.allocate_tensors()
        runners = {
            "(a) layer, tf.function": lambda x=x: graph_fn(x).numpy(),
            "(b) layer, TFLite / LiteRT": lambda x=x, it=interpreter: _invoke(it, x),
            "(c) librosa + numpy reference": lambda x=x: reference(x),
        }
        outputs = {name: run() for name, run in runners.items()}  # warm-up (tracing, allocation) + outputs
        agreement[batch] = {
            name: float(np.mean(np.abs(out - outputs["(c) librosa + numpy reference"])))
            for name, out in outputs.items()
        }
        times = {name: [] for name in runners}
        for _ in range(repetitions[batch]):
            for name, run in runners.items():  # interleaved: a load spike hits every pipeline
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ref_ms = statistics.median(times["(c) librosa + numpy reference"]) * 1000 / batch
        for name, samples in times.items():
            ms = statistics.median(samples) * 1000 / batch
            rows.append((name, batch, ms, min(samples) * 1000 / batch, ref_ms / ms, agreement[batch][name]))
        print(f"batch {batch}: done", file=sys.stderr)

    report = _report(rows, args, load_before, os.getloadavg(), tf, librosa)
    print(report)
    atomic_write(args.out, report)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


class Reference:
    """The same pipeline written with librosa, numpy and PIL, vectorised where those libraries allow."""

    def __init__(self, layer, librosa) -> None:
        from PIL import Image

        from dsl_fed.spectrogram import colormap_lut

        self.layer, self.librosa, self.image = layer, librosa, Image
        lut = colormap_lut(layer.colormap)
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        self.lut = ((lut / 255.0 - mean) / std).astype(np.float32)  # normalised colours, as the layer folds them

    def __call__(self, waves: np.ndarray) -> np.ndarray:
        layer, size = self.layer, (self.layer.image_size, self.layer.image_size)
        peak = np.max(np.abs(waves), axis=1, keepdims=True)
        x = np.divide(waves, peak, out=np.zeros_like(waves), where=peak > 0)
        power = self.librosa.feature.melspectrogram(
            y=x, sr=layer.sample_rate, n_fft=layer.n_fft, hop_length=layer.hop, window="hann", center=True,
            pad_mode="constant", power=2.0, n_mels=layer.n_mels, fmin=layer.fmin, fmax=layer.fmax,
        )
        # librosa's own top_db floor (default 80 dB) is taken from the maximum of the whole call, i.e. of the
        # batch; the layer floors each chunk at its own maximum, so librosa's is switched off and applied per chunk
        db = self.librosa.power_to_db(power, ref=layer.db_ref, amin=layer.db_amin, top_db=None)[:, ::-1]
        db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - layer.top_db)
        low = db.min(axis=(1, 2), keepdims=True)
        grey = (db - low) * (255.0 / np.maximum(db.max(axis=(1, 2), keepdims=True) - low, 1e-6))
        index = np.minimum(np.floor(grey), 254).astype(np.int64)
        frac = (grey - index)[..., None].astype(np.float32)
        colour = self.lut[index] * (1 - frac) + self.lut[index + 1] * frac  # (B, mels, frames, 3)
        out = np.empty((len(waves), size[1], size[0], 3), np.float32)
        for b in range(len(waves)):
            for c in range(3):
                out[b, :, :, c] = self.image.fromarray(np.ascontiguousarray(colour[b, :, :, c])).resize(
                    size, self.image.BILINEAR
                )
        return out


def _convert(keras, tf, layer) -> bytes:
    inputs = keras.Input((SAMPLES,))
    model = keras.Model(inputs, layer(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def _invoke(interpreter, x: np.ndarray) -> np.ndarray:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _signals(n: int, librosa) -> np.ndarray:
    """Chirps and noise at different levels: realistic enough that no stage hits a shortcut."""
    rng = np.random.default_rng(0)
    out = np.empty((n, SAMPLES), np.float32)
    for i in range(n):
        chirp = librosa.chirp(fmin=80 + 10 * i, fmax=7000, sr=SR, length=SAMPLES)
        out[i] = rng.uniform(0.05, 1.0) * chirp + rng.uniform(0.005, 0.1) * rng.standard_normal(SAMPLES)
    return out


def _report(rows, args, load_before, load_after, tf, librosa) -> str:
    import ai_edge_litert

    from dsl_fed.stats import cpu_vector_extensions

    lines = [
        "# Preprocessing benchmark",
        "",
        f"`python benchmarks/preprocessing.py{' --quick' if args.quick else ''}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()} "
        f"({', '.join(cpu_vector_extensions()) or 'unknown vector extensions'}), "
        f"{os.cpu_count()} CPUs visible, {args.threads} threads; TF {tf.__version__}, "
        f"LiteRT {getattr(ai_edge_litert, '__version__', '?')}, librosa {librosa.__version__}.",
        f"Load average (1/5/15 min) before: {' / '.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {' / '.join(f'{v:.2f}' for v in load_after)} (other processes share the CPU).",
        "",
        "One 3 s / 16 kHz chunk -> 224 x 224 x 3 normalised image (viridis, torch mode). Median of interleaved calls.",
        "",
        "| pipeline | batch | ms / chunk (median) | ms / chunk (best) | speed-up vs (c) | mean abs diff vs (c) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, batch, ms, best_ms, ratio, diff in rows:
        lines.append(f"| {name} | {batch} | {ms:.3f} | {best_ms:.3f} | {ratio:.1f}x | {diff:.1e} |")
    batched = {name: ms for name, batch, ms, _, _, _ in rows if batch == max(BATCHES)}
    best = min(ms for name, ms in batched.items() if not name.startswith("(c)"))
    lines += [
        "",
        f"Targets: <= 1 ms per chunk batched — {'met' if best <= 1.0 else 'missed'} (best layer pipeline "
        f"{best:.3f} ms); >= 2x faster than the reference — "
        f"{'met' if all(r >= 2 for n, _, _, _, r, _ in rows if not n.startswith('(c)')) else 'not met for every row'}.",
        "Speed-ups compare medians; 'best' is the fastest single call (least disturbed by other processes).",
        "The diff column is in normalised units (1 colour level = 0.017): "
        + ("all three compute the same image (mean differences below 0.1 colour levels)."
           if max(diff for *_, diff in rows) < 0.1 / (255 * 0.224) else "the pipelines differ by 0.1 colour levels or more."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
