"""Training throughput on this CPU: plain fit vs SapAugment fit, phase 1 vs phase 2.

    python benchmarks/training.py            # DenseNet121, 224x224, batch 32, 3 s chunks (a few minutes on 2 cores)
    python benchmarks/training.py --quick    # smoke run: batch 8, 112x112, 2 timed steps, no worst-case row

The full `dsl_fed` model (raw 3 s waveform -> SpectrogramImage -> DenseNet121 -> ARELU head) is trained with
`model.fit` on a random batch, weights None (ImageNet weights do not change the cost). Every variant is its own,
identically initialised model compiled for the phase exactly as `dsl_fed.train.train_local` does
(`compile_for_phase`); after warm-up steps (tracing) the variants' timed steps are interleaved, so a busy machine
slows all of them alike. The table gives the median step time and samples/s. SapAugment rows use the paper's
CutMix + SpecAugment settings (execution probability in [0.10, 0.25] per augmentation) and, as the worst case,
probability 1 for both. Target: SapAugment at the paper's settings costs <= 25 % over plain fit.

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

from dsl_fed.augment import sap_strength  # noqa: E402
from dsl_fed.config import AugmentConfig, from_dict  # noqa: E402
from dsl_fed.io import atomic_write  # noqa: E402
from dsl_fed.models import build_model, trainable_weight_names  # noqa: E402
from dsl_fed.train import compile_for_phase  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training.md"
VARIANTS = {
    "none": {},
    "SapAugment, p in [0.10, 0.25]": {"cutmix": True, "specaugment": True},  # the paper's settings
    "SapAugment, p = 1 (worst case)": {"cutmix": True, "specaugment": True, "p_min": 1.0, "p_max": 1.0},
}


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
    for _ in range(args.steps):  # fit() reuses the traced train function: one timed step per variant per round
        for aug_label, model in models.items():
            model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False, callbacks=[timers[aug_label]])
    out = {}
    for aug_label, model in models.items():
        times = timers[aug_label].times
        step = statistics.median(times)
        out[aug_label] = {"step": step, "spread": (min(times), max(times)), "samples_per_s": args.batch / step,
                          "trainable": len(trainable_weight_names(model))}
    return out


def expected_augmented_fraction(cfg: AugmentConfig, batch: int, size: int) -> float:
    """Expected share of a batch that SapAugment changes (and so runs through the classifier twice).

    Sample of loss rank i gets strength lambda_i and execution probability p_i per augmentation; it is changed
    if CutMix or SpecAugment fires with a patch / mask of at least one pixel.
    """
    lam = sap_strength(np.arange(batch, dtype=np.float32), cfg.sap_a, cfg.sap_s).numpy()
    p = cfg.p_min + (cfg.p_max - cfg.p_min) * lam
    cut = np.round((cfg.cutmix_min + (cfg.cutmix_max - cfg.cutmix_min) * lam) * size) > 0 if cfg.cutmix else np.zeros(batch, bool)
    mask = np.round(cfg.specaugment_max * lam * size) > 0 if cfg.specaugment else np.zeros(batch, bool)
    return float(np.mean(1 - (1 - p * cut) * (1 - p * mask)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 112 px, 1 warm-up + 2 timed steps, no p=1 row")
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

    variants = list(VARIANTS) if not args.quick else list(VARIANTS)[:2]
    models = {label: build_model(_config(args, {}), 4) for label in variants}  # same seed: identical weights
    load_before = os.getloadavg()[0]
    results = []
    for phase in (1, 2):
        label = "phase 1 (head)" if phase == 1 else f"phase 2 (top {args.unfrozen} layers)"
        for aug_label, r in _time_phase(models, args, phase).items():
            results.append((label, phase, aug_label, r))
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"

    plain = {phase: r["step"] for _, phase, aug, r in results if aug == "none"}
    paper_share = expected_augmented_fraction(_config(args, VARIANTS["SapAugment, p in [0.10, 0.25]"]).augment, args.batch, args.size)
    worst_share = expected_augmented_fraction(_config(args, VARIANTS["SapAugment, p = 1 (worst case)"]).augment, args.batch, args.size)
    lines = [
        f"# Training throughput: {args.backbone}, {args.size}x{args.size}, batch {args.batch}, 3 s chunks",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}, 1-minute load average {load} (the machine is shared). "
        f"Median of {args.steps} timed steps per row after {args.warmup} warm-up steps, the rows' steps interleaved; "
        f"weights None. Command: `python benchmarks/training.py{' --quick' if args.quick else ''}`.",
        "",
        "| phase | augmentation | trainable weights | step time s (min-max) | samples/s | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for label, phase, aug_label, r in results:
        overhead = r["step"] / plain[phase] - 1
        lo, hi = r["spread"]
        lines.append(
            f"| {label} | {aug_label} | {r['trainable']} | {r['step']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{r['samples_per_s']:.1f} | {'-' if aug_label == 'none' else f'{100 * overhead:+.0f} %'} |"
        )
    lines += [
        "",
        f"Phase 2 / phase 1 step time (plain): {plain[2] / plain[1]:.2f}x.",
        "",
        "SapAugment reuses the clean forward pass (needed for the loss ranking) as the training pass of every "
        "sample it leaves unchanged, and runs only the changed samples through the classifier again, so its cost "
        f"is about the share of changed samples: {100 * paper_share:.1f} % of a batch of {args.batch} on average at "
        f"the paper's probabilities ({100 * worst_share:.1f} % at p = 1), plus the augmentation ops and a second "
        "classifier call. A <= 25 % overhead at the paper's probabilities would need fewer augmented samples than "
        "the policy asks for; the authors' implementation ran a full second pass (+100 % in phase 1, where the "
        "frozen backbone's forward pass is the whole step). The share varies from batch to batch, hence the "
        "min-max spread; on a shared machine the absolute times also move with the load.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    atomic_write(args.out, table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
