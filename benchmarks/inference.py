"""Inference benchmark: the paper's Table 4 on this machine, and what quantisation costs on a trained network.

Run:  python benchmarks/inference.py [--part latency|accuracy|both] [--quick] [--threads 2] [--runs 50]
Writes benchmarks/results/inference_latency.md and/or inference_accuracy.md, and prints them.

Latency - DenseNet121 (224x224, random weights: speed does not depend on the values), raw 3 s / 16 kHz audio in,
SpectrogramImage inside: parameters (TFLite rows: counted in the file), FLOPs, file size, mean/median latency
at batch 1 and peak memory of the preprocessing alone, the Keras model and its TFLite fp32 / fp16 / dynamic /
int8 exports (`dsl_fed.stats`), and which operators of each export XNNPACK (LiteRT's CPU delegate) leaves to
the built-in kernels. Targets (2 cores): TFLite fp32 <= 30 ms per 3 s chunk and <= 0.5x Keras; int8 <= 12 ms,
<= 8.5 MB and <= 0.6x fp32. The CPU's vector extensions are printed next to the numbers: int8 speed depends on
them (see the notes the script writes).

Accuracy - a real backbone trained from scratch (no pretrained weights offline) with `dsl_fed train --central`
on the demo corpus (`configs/int8_demo.yaml`: ResNet50 at 64x64 px), exported with `dsl_fed export`'s code to
every precision: clip-level test UAR of the Keras model and of each export, the test clips whose decision
changed, top-1 agreement and the largest probability difference per chunk. Target: int8 UAR drop <= 1 point.
`--model RUN/model.keras` measures a model trained before (its run folder's config.yaml is used).

`--quick` uses a smaller corpus, 2 epochs and 10 timed runs (a smoke test). Timings are wall-clock on a
possibly shared machine: every row is measured in `--repeats` interleaved rounds and the round with the lowest
median is kept; the header records the load average. `--keep DIR` keeps the trained model and exports there
(a second run reuses the trained model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from dsl_fed.export import CALIBRATION_EXAMPLES, QUANTIZATIONS as PRECISIONS  # noqa: E402 - after the log level is set

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ACCURACY_CONFIG = REPO / "configs" / "int8_demo.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["latency", "accuracy", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small corpus, 2 epochs, 10 timed runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (default 50, --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds, best kept (default 3, --quick 1)")
    parser.add_argument("--config", type=Path, default=ACCURACY_CONFIG,
                        help="accuracy: training config, run on a demo corpus made here (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help="accuracy: a model.keras from `dsl_fed train --central` instead of training one")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the trained model and exports here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for inference_<part>.md")
    args = parser.parse_args()
    runs = args.runs or (10 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 3)
    from dsl_fed.io import atomic_write

    with tempfile.TemporaryDirectory(prefix="dsl_fed_bench_") as tmp:
        work = args.keep or Path(tmp)
        for part in ("latency", "accuracy") if args.part == "both" else (args.part,):
            started = time.time()
            if part == "latency":
                section = render_latency(benchmark_latency(demo_corpus(work, args.quick), work, args.threads, runs,
                                                           repeats), args.threads, runs, repeats)
            else:
                section = render_accuracy(benchmark_accuracy(args, work))
            report = render(part, section, args, runs, repeats, time.time() - started)
            target = atomic_write(args.out / f"inference_{part}.md", report)
            print(report)
            print(f"written to {target}", file=sys.stderr)
    return 0


def demo_corpus(work: Path, quick: bool) -> Path:
    """The demo corpus in `work` (made once): `dsl_fed make-demo-data`'s default size, smaller with --quick."""
    from dsl_fed.data.demo import make_demo_corpus

    manifest_csv = work / "demo" / "manifest.csv"
    if not manifest_csv.is_file():
        speakers, clips = (8, 3) if quick else (10, 6)
        manifest_csv = make_demo_corpus(work / "demo", speakers=speakers, clips=clips, seed=0, progress=False)
    return manifest_csv


def log(text: str) -> None:
    print(f"[inference] {text}", file=sys.stderr, flush=True)


def delegation(path: Path, threads: int) -> dict:
    """How LiteRT's default XNNPACK delegate splits a model: partitions, and the ops it leaves to built-ins.

    LiteRT has no public call for this, so it is read from the interpreter's node list after delegation: each
    DELEGATE node stands for one XNNPACK partition; walking back from its outputs to its inputs finds the
    original nodes it replaced. Every other node runs as a LiteRT built-in kernel.
    """
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    nodes = interpreter._get_ops_details()  # noqa: SLF001 - the only view of the delegated graph
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    producer = {int(t): n["index"] for n in nodes if n["op_name"] != "DELEGATE" for t in n["outputs"]}
    delegated: set[int] = set()
    partitions = [n for n in nodes if n["op_name"] == "DELEGATE"]
    for partition in partitions:
        stop, todo = {int(t) for t in partition["inputs"]}, [int(t) for t in partition["outputs"]]
        while todo:
            tensor = todo.pop()
            if tensor in stop or tensor not in producer or producer[tensor] in delegated:
                continue
            delegated.add(producer[tensor])
            todo.extend(int(t) for t in nodes[producer[tensor]]["inputs"] if t >= 0)

    def describe(node: dict) -> str:
        return f"{node['op_name']} ({dtypes[int(node['outputs'][0])]})"

    left = Counter(describe(n) for n in nodes if n["op_name"] != "DELEGATE" and n["index"] not in delegated)
    return {"partitions": len(partitions), "delegated": len(delegated), "left": dict(sorted(left.items()))}


# ------------------------------------------------------------------------------------------------ latency


def benchmark_latency(manifest_csv: Path, work: Path, threads: int, runs: int, repeats: int) -> dict:
    """Table 4 rows for DenseNet121 with raw-audio input, and how XNNPACK takes each export."""
    from dsl_fed.config import from_dict
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.models import build_model
    from dsl_fed.stats import QUANT_LABELS, model_stats

    cfg = from_dict({
        "data": {"manifest": str(manifest_csv), "chunk_seconds": 3.0, "hop_seconds": 1.5},
        "spectrogram": {"image_size": 224, "n_mels": 128},
        "model": {"backbone": "densenet121", "weights": None, "units": 512},
    })
    manifest = read_manifest(manifest_csv)
    log("latency: building DenseNet121 224x224")
    model = build_model(cfg, len(manifest.classes))
    model_path = work / "densenet121_224" / "model.keras"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    log(f"latency: exports and measurements ({runs} runs, {threads} threads)")
    exports = work / "densenet121_224" / "exports"
    rows = model_stats(model_path, cfg, manifest.classes, threads=threads, runs=runs, repeats=repeats,
                       representative=train, work_dir=exports)
    split = {quant: delegation(exports / QUANT_LABELS[quant] / "model.tflite", threads) for quant in PRECISIONS}
    return {"rows": rows, "delegation": split}


def render_latency(result: dict, threads: int, runs: int, repeats: int) -> str:
    from dsl_fed.stats import QUANT_LABELS, cpu_vector_extensions, stats_table

    rows = {r.name: r for r in result["rows"]}
    keras, predict = rows["Keras model"], rows["Keras model.predict"]
    fp32, int8 = rows["TFLite fp32"], rows["TFLite int8"]
    targets = [
        ("TFLite fp32 latency per 3 s chunk", "≤ 30 ms", f"{fp32.median_ms:.1f} ms", fp32.median_ms <= 30),
        ("TFLite fp32 / Keras (compiled call)", "≤ 0.5", f"{fp32.median_ms / keras.median_ms:.2f}",
         fp32.median_ms <= 0.5 * keras.median_ms),
        ("TFLite fp32 / Keras (model.predict)", "≤ 0.5", f"{fp32.median_ms / predict.median_ms:.2f}",
         fp32.median_ms <= 0.5 * predict.median_ms),
        ("TFLite int8 latency", "≤ 12 ms", f"{int8.median_ms:.1f} ms", int8.median_ms <= 12),
        ("TFLite int8 / fp32 latency", "≤ 0.6", f"{int8.median_ms / fp32.median_ms:.2f}",
         int8.median_ms <= 0.6 * fp32.median_ms),
        ("TFLite int8 file size", "≤ 8.5 MB", f"{int8.file_bytes / 1e6:.2f} MB", int8.file_bytes <= 8.5e6),
    ]
    lines = [
        "## Latency: DenseNet121, 224×224, raw 3 s audio in (random weights)",
        "",
        stats_table(result["rows"], threads, runs, title="DenseNet121 + SpectrogramImage", repeats=repeats).strip(),
        "",
        "How LiteRT's XNNPACK delegate takes each export (nodes it replaced, partitions, and the nodes left to "
        "LiteRT's built-in kernels, with their output type):",
        "",
        "| export | nodes in XNNPACK | partitions | left to built-in kernels |",
        "|---|---:|---:|---|",
    ]
    for quant, split in result["delegation"].items():
        left = ", ".join(f"{n}× {op}" for op, n in split["left"].items()) or "none"
        lines.append(f"| TFLite {QUANT_LABELS[quant]} | {split['delegated']} | {split['partitions']} | {left} |")
    lines += ["", "| target | goal | measured (median) | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {goal} | {value} | {'yes' if ok else '**no**'} |" for name, goal, value, ok in targets]
    lines += ["", int8_kernel_note(cpu_vector_extensions(), int8.median_ms / fp32.median_ms)]
    return "\n".join(lines)


def int8_kernel_note(extensions: list[str], ratio: float) -> str:
    """Which XNNPACK int8 GEMM kernels this CPU gets, and what that implies next to the measured ratio.

    Kernel choice as in XNNPACK's ``src/configs/gemm-config.c`` (``init_qs8_qc8w_gemm_config``): AVX-512 VNNI
    -> ``7x16c8__avx512vnni`` (``vpdpbusd``: 64 int8 multiply-adds per instruction, accumulate included, 4x an
    fp32 FMA on the same width); AVX-VNNI -> ``5x8c8__avxvnni``; AVX2 alone -> ``3x8c8__avx2``, which sign-extends
    int8 to int16, multiplies with ``vpmaddwd`` and accumulates with a separate ``vpaddd``.
    `benchmarks/xnnpack_kernels.py` times these kernels against the fp32 ones.
    """
    measured = f"Measured here: int8 / fp32 = {ratio:.2f}."
    if "avx512_vnni" in extensions or "avx_vnni" in extensions:
        return (f"{measured} This CPU has VNNI, so XNNPACK runs int8 convolutions with `vpdpbusd` kernels (4× the "
                "int8 multiply-adds per instruction of an fp32 FMA of the same width).")
    if "avx2" in extensions:
        return (f"{measured} This CPU has AVX2 without VNNI: XNNPACK's int8 kernels (`3x8c8__avx2`) widen int8 "
                "to int16, multiply with `vpmaddwd` and accumulate with `vpaddd`, about as fast per multiply-add as the "
                "fp32 FMA kernels (`benchmarks/xnnpack_kernels.py` times both), so int8 cannot be much faster than "
                "fp32 here; its gains are size and memory.")
    return f"{measured} No AVX2 reported: XNNPACK falls back to SSE kernels."


# ----------------------------------------------------------------------------------------------- accuracy


def benchmark_accuracy(args: argparse.Namespace, work: Path) -> dict:
    """Clip-level test UAR of a trained model: Keras vs every TFLite precision, and per-chunk agreement."""
    from dsl_fed.central import load_partitions
    from dsl_fed.export import export_tflite, verify_tflite
    from dsl_fed.litert import TFLiteRunner
    from dsl_fed.metrics import uar
    from dsl_fed.models import load_model
    from dsl_fed.predict import average_by_clip, predict_clips
    from dsl_fed.stats import QUANT_LABELS

    model_path, cfg, metrics = trained_model(args, work)
    manifest, train, _, test = load_partitions(cfg, progress=False)
    if test is None:
        raise SystemExit(f"{cfg.data.manifest}: no test partition to measure on")
    model = load_model(model_path)
    _, probs, labels, _ = predict_clips(model, test)
    keras_decisions = probs.argmax(axis=1)
    results = {"Keras": {"uar": uar(labels, keras_decisions), "size": None}}
    exports = work / "exports" / cfg.output.name
    for quant in PRECISIONS:
        log(f"accuracy: TFLite {QUANT_LABELS[quant]}")
        path = export_tflite(model, exports / QUANT_LABELS[quant] / "model.tflite", quant,
                             representative=train if quant == "int8" else None, classes=manifest.classes, cfg=cfg)
        chunk_probs = TFLiteRunner(path, threads=args.threads).predict(test.waveforms)
        _, clip_probs, clip_labels, _ = average_by_clip(chunk_probs, test)
        check = verify_tflite(model, path, test, threads=args.threads)
        results[f"TFLite {QUANT_LABELS[quant]}"] = {
            "uar": uar(clip_labels, clip_probs.argmax(axis=1)), "size": path.stat().st_size,
            "agreement": check["top1_agreement"], "max_abs_diff": check["max_abs_diff"],
            "clips_changed": int(np.sum(clip_probs.argmax(axis=1) != keras_decisions)),
        }
    per_class = np.bincount(labels, minlength=len(manifest.classes))
    return {"results": results, "clips": int(len(labels)), "chunks": int(len(test)), "cfg": cfg,
            "one_clip": 100 / (len(per_class) * per_class.max()),
            "train_chunks": len(train), "params": int(model.count_params()), "metrics": metrics,
            "model": model_path}


def trained_model(args: argparse.Namespace, work: Path) -> tuple[Path, object, dict]:
    """`--model`'s run folder, or a `dsl_fed train --central --config` run on a demo corpus in `work` (reused)."""
    from dsl_fed.central import run_central
    from dsl_fed.config import load_config

    if args.model is not None:
        run_dir = args.model.parent
        cfg = load_config(run_dir / "config.yaml")
        return args.model, cfg, json.loads((run_dir / "metrics.json").read_text())
    overrides = [f"data.manifest={demo_corpus(work, args.quick)}", f"output.directory={work / 'runs'}"]
    if args.quick:
        overrides += ["training.phase2_epochs=2"]
    cfg = load_config(args.config, overrides)
    model_path = cfg.output.run_dir / "model.keras"
    if model_path.is_file():
        log(f"accuracy: reusing {model_path}")
        return model_path, cfg, json.loads((cfg.output.run_dir / "metrics.json").read_text())
    log(f"accuracy: dsl_fed train --central {args.config} ({cfg.model.backbone}, {cfg.spectrogram.image_size} px)")
    metrics = run_central(cfg, verbose=2, command=f"python benchmarks/inference.py --part accuracy --config {args.config}")
    return model_path, cfg, metrics


def render_accuracy(result: dict) -> str:
    r, cfg, metrics = result["results"], result["cfg"], result["metrics"]
    keras_uar = r["Keras"]["uar"]
    drop = 100 * (keras_uar - r["TFLite int8"]["uar"])
    training = metrics.get("training", {})
    scratch = not cfg.model.weights
    lines = [
        f"## Accuracy: {cfg.model.backbone} {'trained from scratch' if scratch else 'fine-tuned'} "
        f"({cfg.spectrogram.image_size}×{cfg.spectrogram.image_size} px, {cfg.data.chunk_seconds:g} s chunks)",
        "",
        f"Model: `{result['model']}`, {result['params'] / 1e6:.2f} M parameters, "
        f"{'random init (`model.weights: null`)' if scratch else f'initial weights `{cfg.model.weights}`'}, "
        f"phase 1 (head) {training.get('phase1_epochs', '?')} epoch(s) + phase 2 ({cfg.training.unfrozen_layers} "
        f"layers) {training.get('phase2_epochs', '?')} epochs on {result['train_chunks']} training chunks "
        f"(`{cfg.data.manifest}`), best devel epoch kept (phase {2 if training.get('phase2_best_epoch') else 1}, "
        f"epoch {training.get('phase2_best_epoch') or training.get('phase1_best_epoch', '?')}): devel UAR "
        f"{metrics['devel']['uar']:.3f}, test UAR {metrics['test']['uar']:.3f} (chance {1 / len(metrics['classes']):.3f}). "
        f"Test: {result['clips']} clips / {result['chunks']} chunks (one clip decided differently moves UAR by "
        f"at least {result['one_clip']:.1f} points); int8 calibrates on "
        f"{min(CALIBRATION_EXAMPLES, result['train_chunks'])} training chunks.",
        "",
        "| model | file size | clip UAR (test) | Δ UAR vs Keras [points] | test clips decided differently "
        "| top-1 agreement (chunks) | max abs prob diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| Keras | – | {keras_uar:.3f} | – | – | – | – |",
    ]
    for name, row in r.items():
        if name == "Keras":
            continue
        lines.append(f"| {name} | {row['size'] / 1e6:.2f} MB | {row['uar']:.3f} | {100 * (row['uar'] - keras_uar):+.1f} | "
                     f"{row['clips_changed']} | {100 * row['agreement']:.1f} % | {row['max_abs_diff']:.2e} |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|",
              f"| int8 UAR drop (Keras − int8, test clips) | ≤ 1 point | {drop:+.1f} points | "
              f"{'yes' if drop <= 1.0 else '**no**'} |"]
    return "\n".join(lines)


def render(part: str, section: str, args: argparse.Namespace, runs: int, repeats: int, seconds: float) -> str:
    from dsl_fed.stats import cpu_vector_extensions

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    command = f"python benchmarks/inference.py --part {part}{' --quick' if args.quick else ''} --threads {args.threads}"
    if part == "accuracy" and args.model is not None:
        command += f" --model {args.model}"
    elif part == "accuracy" and args.config.resolve() != ACCURACY_CONFIG:
        command += f" --config {args.config}"
    timing = f"{runs} timed runs per row, best of {repeats} interleaved repeats · " if part == "latency" else ""
    return "\n".join([
        f"# Inference benchmark: {part}",
        "",
        f"Command: `{command}` · {timing}load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(other jobs share the CPU) · {seconds / 60:.1f} min · CPU vector extensions: "
        f"{', '.join(cpu_vector_extensions()) or 'none reported'}",
        "",
        section,
        "",
        "The int8 export keeps the spectrogram front end in float32 (its dB range does not fit int8) with its DFT and",
        "Mel constants stored as float16; the classifier is full-integer. The dynamic export keeps the front end's",
        "float weights. Peak memory is measured in a fresh process per row (see `dsl_fed/stats.py`).",
    ]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
