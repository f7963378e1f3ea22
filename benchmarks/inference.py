"""Inference benchmark: the paper's Table 4 on this machine, plus what quantisation costs in UAR.

Run:  python benchmarks/inference.py [--quick] [--threads 2] [--runs 50] [--repeats 3]
Writes benchmarks/results/inference.md (and prints it).

Part 1 - DenseNet121 (224x224, random weights: speed does not depend on the values), raw 3 s / 16 kHz audio in,
SpectrogramImage inside: parameters, FLOPs, file size, mean/median latency at batch 1 and peak memory of the
preprocessing alone, the Keras model and its TFLite fp32 / fp16 / dynamic / int8 exports (`dsl_fed.stats`),
plus each export's agreement with Keras on demo-corpus chunks (`dsl_fed.export.verify_tflite`).
Targets (2 cores): TFLite fp32 <= 30 ms per 3 s chunk and <= 0.5x Keras; int8 <= 12 ms, <= 8.5 MB.

Part 2 - a tiny CNN trained on the demo corpus (the `tiny_config` test settings): clip-level test UAR of the
Keras model and of every TFLite precision. Target: int8 UAR drop <= 1 point.

`--quick` uses a smaller demo corpus, 10 timed runs and one repeat (a smoke test, ~4 min); the full run takes
~12 min on 2 cores. Timings are wall-clock on a possibly shared machine: every row is measured in `--repeats`
interleaved rounds and the round with the lowest median is kept; the header records the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dsl_fed.stats import QUANT_LABELS as LABELS  # noqa: E402 - after the log level is set

RESULTS = Path(__file__).resolve().parent / "results" / "inference.md"
PRECISIONS = tuple(LABELS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, 10 timed runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (default 50, --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds, best kept (default 3, --quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = args.runs or (10 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dsl_fed_bench_") as tmp:
        work = Path(tmp)
        speakers, clips = (8, 3) if args.quick else (10, 6)
        from dsl_fed.data.demo import make_demo_corpus

        manifest_csv = make_demo_corpus(work / "demo", speakers=speakers, clips=clips, seed=0, progress=False)
        densenet = benchmark_densenet(manifest_csv, work, args.threads, runs, repeats)
        tiny = benchmark_tiny(manifest_csv, work, args.threads)
    report = render(densenet, tiny, args, runs, repeats, speakers, clips, time.time() - started)
    from dsl_fed.io import atomic_write

    atomic_write(args.out, report)
    print(report)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def log(text: str) -> None:
    print(f"[inference] {text}", file=sys.stderr, flush=True)


def benchmark_densenet(manifest_csv: Path, work: Path, threads: int, runs: int, repeats: int) -> dict:
    """Table 4 rows for DenseNet121 with raw-audio input, plus each export's parity with Keras."""
    from dsl_fed.config import from_dict
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.export import verify_tflite
    from dsl_fed.models import build_model
    from dsl_fed.stats import model_stats

    cfg = from_dict({
        "data": {"manifest": str(manifest_csv), "chunk_seconds": 3.0, "hop_seconds": 1.5},
        "spectrogram": {"image_size": 224, "n_mels": 128},
        "model": {"backbone": "densenet121", "weights": None, "units": 512},
    })
    manifest = read_manifest(manifest_csv)
    log("DenseNet121: building and saving")
    model = build_model(cfg, len(manifest.classes))
    model_path = work / "densenet121" / "model.keras"
    model_path.parent.mkdir(parents=True)
    model.save(model_path)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    test = load_chunks(manifest.partition("test"), cfg.data, manifest.classes, progress=False)
    log(f"DenseNet121: exports and measurements ({runs} runs, {threads} threads)")
    rows = model_stats(model_path, cfg, manifest.classes, threads=threads, runs=runs, repeats=repeats, representative=train,
                       work_dir=work / "densenet121" / "exports")
    samples = test.waveforms[:: max(1, len(test) // 32)][:32]
    parity = {}
    for quant in PRECISIONS:
        path = work / "densenet121" / "exports" / LABELS[quant] / "model.tflite"
        parity[quant] = verify_tflite(model, path, samples, threads=threads)
    return {"rows": rows, "parity": parity, "params": model.count_params()}


def benchmark_tiny(manifest_csv: Path, work: Path, threads: int) -> dict:
    """Clip-level test UAR of a trained tiny model: Keras vs every TFLite precision."""
    from dsl_fed.config import from_dict
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.export import export_tflite, verify_tflite
    from dsl_fed.litert import TFLiteRunner
    from dsl_fed.metrics import uar
    from dsl_fed.models import build_model
    from dsl_fed.predict import average_by_clip, predict_clips
    from dsl_fed.train import train_local

    cfg = from_dict({
        "data": {"manifest": str(manifest_csv), "chunk_seconds": 1.0, "hop_seconds": 0.25},
        "spectrogram": {"image_size": 32, "n_mels": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 32, "dropout": 0.1},
        "training": {"optimizer": "adam", "learning_rate": 0.003, "phase2_lr_factor": 1.0, "batch_size": 16,
                     "phase1_epochs": 1, "phase2_epochs": 15, "unfrozen_layers": 6},
    })
    manifest = read_manifest(manifest_csv)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    test = load_chunks(manifest.partition("test"), cfg.data, manifest.classes, progress=False)
    log(f"tiny: training on {len(train)} chunks")
    model = build_model(cfg, len(manifest.classes))
    train_local(model, train, None, cfg, phase=1, verbose=0)
    train_local(model, train, None, cfg, phase=2, verbose=0)
    _, probs, labels, _ = predict_clips(model, test)
    results = {"keras": {"uar": uar(labels, probs.argmax(axis=1)), "size": None}}
    for quant in PRECISIONS:
        path = export_tflite(model, work / "tiny" / LABELS[quant] / "model.tflite", quant,
                             representative=train if quant == "int8" else None, classes=manifest.classes, cfg=cfg)
        chunk_probs = TFLiteRunner(path, threads=threads).predict(test.waveforms)
        _, clip_probs, clip_labels, _ = average_by_clip(chunk_probs, test)
        check = verify_tflite(model, path, test)
        results[quant] = {
            "uar": uar(clip_labels, clip_probs.argmax(axis=1)),
            "size": path.stat().st_size,
            "agreement": check["top1_agreement"],
            "max_abs_diff": check["max_abs_diff"],
        }
    results["clips"] = int(len(labels))
    results["chunks"] = int(len(test))
    results["params"] = model.count_params()
    return results


def render(densenet: dict, tiny: dict, args: argparse.Namespace, runs: int, repeats: int, speakers: int, clips: int,
           seconds: float) -> str:
    from dsl_fed.stats import stats_table

    rows = {r.name: r for r in densenet["rows"]}
    keras, predict = rows["Keras model"], rows["Keras model.predict"]
    fp32, int8 = rows["TFLite fp32"], rows["TFLite int8"]
    drop = 100 * (tiny["keras"]["uar"] - tiny["int8"]["uar"])
    targets = [
        ("TFLite fp32 latency per 3 s chunk", "≤ 30 ms", f"{fp32.mean_ms:.1f} ms (median {fp32.median_ms:.1f})",
         fp32.mean_ms <= 30),
        ("TFLite fp32 / Keras latency (compiled call)", "≤ 0.5", f"{fp32.mean_ms / keras.mean_ms:.2f}",
         fp32.mean_ms <= 0.5 * keras.mean_ms),
        ("TFLite fp32 / Keras latency (model.predict)", "≤ 0.5", f"{fp32.mean_ms / predict.mean_ms:.2f}",
         fp32.mean_ms <= 0.5 * predict.mean_ms),
        ("TFLite int8 latency", "≤ 12 ms", f"{int8.mean_ms:.1f} ms (median {int8.median_ms:.1f})", int8.mean_ms <= 12),
        ("TFLite int8 file size", "≤ 8.5 MB", f"{int8.file_bytes / 1e6:.2f} MB", int8.file_bytes <= 8.5e6),
        ("int8 UAR drop (tiny model, demo test)", "≤ 1 point", f"{drop:+.1f} points", drop <= 1.0),
    ]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Inference benchmark (Table 4 analogue)",
        "",
        f"Command: `python benchmarks/inference.py{' --quick' if args.quick else ''} --threads {args.threads}"
        f"{'' if args.runs is None else f' --runs {args.runs}'}"
        f"{'' if args.repeats is None else f' --repeats {args.repeats}'}` · "
        f"{runs} timed runs per row, best of {repeats} interleaved repeats · "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (other jobs share the CPU) · "
        f"total {seconds / 60:.1f} min",
        "",
        "## DenseNet121, 224×224, raw 3 s audio in (random weights)",
        "",
        stats_table(densenet["rows"], args.threads, runs, title="DenseNet121 + SpectrogramImage", repeats=repeats).strip(),
        "",
        "Agreement of each export with the Keras model on demo-corpus test chunks (random weights, so the",
        "probabilities are close to uniform — the hardest case for top-1 agreement):",
        "",
        "| export | max abs prob diff | top-1 agreement |",
        "|---|---:|---:|",
    ]
    for quant, check in densenet["parity"].items():
        lines.append(f"| TFLite {LABELS[quant]} | {check['max_abs_diff']:.2e} | {100 * check['top1_agreement']:.1f} % |")
    lines += [
        "",
        f"## Trained tiny CNN on the demo corpus ({speakers} speakers × 3 classes × {clips} clips; "
        f"test: {tiny['clips']} clips / {tiny['chunks']} chunks)",
        "",
        "| model | file size | clip UAR (test) | Δ UAR vs Keras [points] | top-1 agreement (chunks) | max abs prob diff |",
        "|---|---:|---:|---:|---:|---:|",
        f"| Keras | – | {tiny['keras']['uar']:.3f} | – | – | – |",
    ]
    for quant in PRECISIONS:
        r = tiny[quant]
        lines.append(
            f"| TFLite {LABELS[quant]} | {r['size'] / 1e3:.1f} kB | {r['uar']:.3f} | "
            f"{100 * (r['uar'] - tiny['keras']['uar']):+.1f} | {100 * r['agreement']:.1f} % | {r['max_abs_diff']:.2e} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *[f"| {name} | {goal} | {value} | {'yes' if ok else '**no**'} |" for name, goal, value, ok in targets],
        "",
        "Notes: the int8 export keeps the spectrogram front end in float32 (its dB range does not fit int8) with its",
        "DFT and Mel constants stored as float16; the classifier is full-integer. The dynamic export gives the front",
        "end its float weights back (the converter's hybrid kernels would quantise the waveform and the power",
        "spectrum to int8). Peak memory is measured in a fresh process per row (see `dsl_fed/stats.py`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
