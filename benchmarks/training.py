"""Training throughput on this CPU: plain fit vs SapAugment fit, phase 1 vs phase 2.

    python benchmarks/training.py            # DenseNet121, 224x224, batch 32, 3 s chunks (a few minutes on 2 cores)
    python benchmarks/training.py --quick    # smoke run: batch 8, 112x112, 2 timed steps, no worst-case row

The full `dsl_fed` model (raw 3 s waveform -> SpectrogramImage -> DenseNet121 -> ARELU head) is trained with
`model.fit` on a random batch, weights None (ImageNet weights do not change the cost). Every variant is its own,
identically initialised model compiled for the phase exactly as `dsl_fed.train.train_local` does
(`compile_for_phase`); after warm-up steps (tracing) the variants' timed steps are interleaved, so a busy machine
slows all of them alike. The table gives the median step time and samples/s. The SapAugment row uses the paper's
CutMix + SpecAugment settings (execution probability in [0.10, 0.25] per augmentation). SapAugment ranks each
batch by the loss of an inference-mode forward pass, so that pass is timed on its own too (interleaved as well):
the verdicts compare the measured overhead with it and with the target (<= 25 % over plain fit).

Writes ``benchmarks/results/training.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dsl_fed.config import from_dict  # noqa: E402
from dsl_fed.io import atomic_write  # noqa: E402
from dsl_fed.models import build_model, trainable_weight_names  # noqa: E402
from dsl_fed.stats import cpu_vector_extensions  # noqa: E402
from dsl_fed.train import compile_for_phase  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training.md"
VARIANTS = {
    "none": {},
    "SapAugment, p in [0.10, 0.25]": {"cutmix": True, "specaugment": True},  # the paper's settings
}
RANKING = "ranking pass alone (inference-mode forward)"
TARGET = 0.25  # SapAugment overhead over plain fit at the paper's settings


class _StepTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def _config(args: argparse.Namespace, augment: dict) -> object:
    return from_dict(
        {
            "data": {"manifest": "unused.csv", "chunk_seconds": 3.0},
            "spectrogram": {"image_size": args.size},
            "model": {"backbone": args.backbone, "weights": None},
            "augment": augment,
            "training": {"batch_size": args.batch, "unfrozen_layers": args.unfrozen},
        }
    )


def _time_phase(models: dict[str, keras.Model], args: argparse.Namespace, phase: int) -> dict[str, dict]:
    """Time every variant on the same batch, interleaving their steps so machine load affects all alike."""
    rng = np.random.default_rng(0)
    chunk_samples = next(iter(models.values())).input_shape[-1]
    x = rng.uniform(-1, 1, (args.batch, chunk_samples)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, args.batch)]
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    timers = {}
    for aug_label, model in models.items():
        compile_for_phase(model, _config(args, VARIANTS[aug_label]), phase, seed=0)
        print(f"tracing phase {phase}, augmentation {aug_label} ...", file=sys.stderr, flush=True)
        model.fit(dataset, steps_per_epoch=args.warmup, epochs=1, verbose=0, shuffle=False)
        timers[aug_label] = _StepTimer()
    plain = models["none"]
    images = plain.spectrogram(x)
    ranking = tf.function(lambda images: plain.classifier(images, training=False))
    ranking(images)  # trace
    ranking_times = []
    for _ in range(args.steps):  # fit() reuses the traced train function: one timed step per variant per round
        for aug_label, model in models.items():
            model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False, callbacks=[timers[aug_label]])
        start = time.perf_counter()
        ranking(images).numpy()
        ranking_times.append(time.perf_counter() - start)
    out = {}
    for aug_label, times in [(label, timers[label].times) for label in models] + [(RANKING, ranking_times)]:
        step = statistics.median(times)
        trainable = len(trainable_weight_names(models[aug_label])) if aug_label in models else 0
        out[aug_label] = {"step": step, "spread": (min(times), max(times)), "samples_per_s": args.batch / step,
                          "trainable": trainable}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 112 px, 1 warm-up + 2 timed steps")
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in px")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (tracing)")
    parser.add_argument("--unfrozen", type=int, default=298, help="phase-2 unfrozen backbone layers (paper: 298)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 32)
    args.size = args.size or (112 if args.quick else 224)
    args.steps = args.steps or (2 if args.quick else 8)
    args.warmup = args.warmup or (1 if args.quick else 2)

    models = {label: build_model(_config(args, {}), 4) for label in VARIANTS}  # same seed: identical weights
    load_before = os.getloadavg()[0]
    results = []
    for phase in (1, 2):
        label = "phase 1 (head)" if phase == 1 else f"phase 2 (top {args.unfrozen} layers)"
        for aug_label, r in _time_phase(models, args, phase).items():
            results.append((label, phase, aug_label, r))
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"

    plain = {phase: r["step"] for _, phase, aug, r in results if aug == "none"}
    options = argv if argv is not None else sys.argv[1:]
    command = "".join(f" {a}" for i, a in enumerate(options) if "--out" not in (a, options[i - 1] if i else ""))
    lines = [
        f"# Training throughput: {args.backbone}, {args.size}x{args.size}, batch {args.batch}, 3 s chunks",
        "",
        f"Machine: {platform.processor() or platform.machine()} "
        f"({', '.join(cpu_vector_extensions()) or 'unknown vector extensions'}), {os.cpu_count()} CPUs "
        f"visible, TensorFlow {tf.__version__}, Keras {keras.__version__}, 1-minute load average {load} (the machine "
        f"is shared). Median of {args.steps} timed steps per row after {args.warmup} warm-up steps, the rows' steps "
        f"interleaved; weights None. Command: `python benchmarks/training.py{command}`.",
        "",
        "| phase | augmentation | trainable weights | step time s (min-max) | samples/s | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for label, phase, aug_label, r in results:
        lo, hi = r["spread"]
        ratio = r["step"] / plain[phase]
        versus = {"none": "-", RANKING: f"{100 * ratio:.0f} % of a step"}.get(aug_label, f"{100 * (ratio - 1):+.0f} %")
        lines.append(f"| {label} | {aug_label} | {r['trainable'] or '-'} | {r['step']:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{r['samples_per_s']:.1f} | {versus} |")
    lines += ["", f"Phase 2 / phase 1 step time (plain): {plain[2] / plain[1]:.2f}x.", ""]
    for phase in (1, 2):
        step = {aug: r["step"] for _, p, aug, r in results if p == phase}
        overhead = step["SapAugment, p in [0.10, 0.25]"] / plain[phase] - 1
        ranking = step[RANKING] / plain[phase]
        lines.append(
            f"- Phase {phase}: SapAugment {100 * overhead:+.0f} % over plain fit, target <= {100 * TARGET:.0f} % "
            f"{'met' if overhead <= TARGET else 'not met'}. Its inference-mode ranking pass alone takes "
            f"{100 * ranking:.0f} % of a plain step; the remaining {100 * (overhead - ranking):+.0f} % is the "
            f"augmentation ops and timing noise."
        )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    atomic_write(args.out, table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
