"""Selective quantisation two ways: dsl_fed's export (converter + flatbuffer edits) vs Google's ai-edge-quantizer.

Run:  pip install ai-edge-quantizer   # not a dsl_fed dependency; see the README's "Deploy to a device"
      python benchmarks/quantizer_comparison.py [--model RUN/model.keras --config RUN/config.yaml]
Writes benchmarks/results/quantizer_comparison.md (or --out) and prints it.

Both keep the spectrogram front end float inside the model: dsl_fed denylists its ops in the converter's
calibrated model and stores its large constants as float16 (`dsl_fed.export`); ai-edge-quantizer gets a recipe:
int8 (or dynamic int8) for every op, no quantisation for the spectrogram scope, float16 weights for its
convolution and matrix product. Compared on the same model and test chunks: clip UAR, top-1 agreement and the
largest probability difference against Keras, file size, median latency (batch 1, 2 threads, in-process) and
the ops XNNPACK leaves to built-in kernels. Without --model it trains the test suite's tiny CNN on a demo corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer_comparison.md"
TINY = {  # the test suite's tiny_config
    "data": {"chunk_seconds": 1.0, "hop_seconds": 0.25},
    "spectrogram": {"image_size": 32, "n_mels": 32},
    "model": {"backbone": "tiny", "weights": None, "units": 32, "dropout": 0.1},
    "training": {"optimizer": "adam", "learning_rate": 0.003, "phase2_lr_factor": 1.0, "batch_size": 16,
                 "phase1_epochs": 1, "phase2_epochs": 15, "unfrozen_layers": 6},
}


def quantize_with_aeq(model, calibration, kind: str) -> bytes:
    """The ai-edge-quantizer route: a float32 conversion plus a recipe."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName as Op

    from dsl_fed.export import convert_keras, split_model

    spectrogram, _ = split_model(model)
    float_model = convert_keras(model, (int(model.input_shape[-1]),))
    scope = rf"(^|/){spectrogram.name}(_\d+)?/"
    qt = quantizer.Quantizer(float_model)
    if kind == "int8":
        qt.add_static_config(".*", Op.ALL_SUPPORTED, 8, 8)
    else:
        qt.add_dynamic_config(".*", Op.ALL_SUPPORTED, 8)
    qt.update_quantization_recipe(scope, Op.ALL_SUPPORTED, algorithm_key=AlgorithmName.NO_QUANTIZE)
    for op in (Op.CONV_2D, Op.FULLY_CONNECTED):
        qt.add_weight_only_config(scope, op, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    calibration_result = None
    if qt.need_calibration:
        signature, io = next(iter(Interpreter(model_content=float_model).get_signature_list().items()))
        calibration_result = qt.calibrate({signature: [{io["inputs"][0]: x[None]} for x in calibration]},
                                          num_threads=2)
    return bytes(qt.quantize(calibration_result, enable_progress_report=False).quantized_model)


def measure(model, path: Path, test) -> dict:
    import numpy as np

    from dsl_fed.export import verify_tflite
    from dsl_fed.litert import TFLiteRunner
    from dsl_fed.metrics import uar
    from dsl_fed.predict import average_by_clip
    from inference import delegation

    runner = TFLiteRunner(path, threads=2)
    _, clip_probs, clip_labels, _ = average_by_clip(runner.predict(test.waveforms), test)
    x = test.waveforms[0]
    for _ in range(3):
        runner.predict_one(x)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        runner.predict_one(x)
        times.append(1000 * (time.perf_counter() - t0))
    check = verify_tflite(model, path, test, threads=2)
    left = delegation(path, 2)["left"]
    return {"uar": uar(clip_labels, clip_probs.argmax(axis=1)), "agreement": check["top1_agreement"],
            "diff": check["max_abs_diff"], "size": path.stat().st_size, "ms": float(np.median(times)),
            "left": ", ".join(f"{n}× {op}" for op, n in left.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="trained .keras model (default: train the tiny CNN)")
    parser.add_argument("--config", type=Path, default=None, help="its config.yaml (with --model)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from importlib.metadata import version

    from dsl_fed.config import from_dict, load_config
    from dsl_fed.data.demo import make_demo_corpus
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.export import CALIBRATION_EXAMPLES, export_tflite
    from dsl_fed.io import atomic_write
    from dsl_fed.models import build_model, load_model
    from dsl_fed.train import train_local

    with tempfile.TemporaryDirectory(prefix="dsl_fed_quant_") as tmp:
        work = Path(tmp)
        if args.model is None:
            manifest_csv = make_demo_corpus(work / "demo", speakers=8, clips=3, seed=0, progress=False)
            cfg = from_dict({**TINY, "data": {**TINY["data"], "manifest": str(manifest_csv)}})
        else:
            cfg = load_config(args.config)
        manifest = read_manifest(cfg.data.manifest, seed=cfg.data.seed)
        train, test = (load_chunks(manifest.partition(p), cfg.data, manifest.classes, progress=False)
                       for p in ("train", "test"))
        if args.model is None:
            model = build_model(cfg, len(manifest.classes))
            train_local(model, train, None, cfg, phase=1, verbose=0)
            train_local(model, train, None, cfg, phase=2, verbose=0)
        else:
            model = load_model(args.model)
        calibration = train.waveforms[:: max(1, len(train) // CALIBRATION_EXAMPLES)][:CALIBRATION_EXAMPLES]
        rows = []
        for kind in ("int8", "dynamic"):
            ours = export_tflite(model, work / f"dsl_fed_{kind}" / "model.tflite", kind,
                                 representative=calibration if kind == "int8" else None, classes=manifest.classes,
                                 cfg=cfg)
            aeq = atomic_write(work / f"aeq_{kind}" / "model.tflite", quantize_with_aeq(model, calibration, kind))
            rows += [(f"dsl_fed {kind}", measure(model, ours, test)),
                     (f"ai-edge-quantizer {kind}", measure(model, aeq, test))]
    name = args.model or f"tiny CNN ({model.count_params()} parameters), trained on a demo corpus"
    lines = [
        "# Selective quantisation: dsl_fed export vs ai-edge-quantizer",
        "",
        f"Command: `python benchmarks/quantizer_comparison.py{f' --model {args.model}' if args.model else ''}` · "
        f"ai-edge-quantizer {version('ai-edge-quantizer')} · model: {name} · "
        f"test: {len(test)} chunks · load average {os.getloadavg()[0]:.2f}",
        "",
        "| export | clip UAR (test) | top-1 agreement | max abs prob diff | file size | median ms | left to built-ins |",
        "|---|---:|---:|---:|---:|---:|---|",
        *[f"| {label} | {r['uar']:.3f} | {100 * r['agreement']:.1f} % | {r['diff']:.3f} | {r['size'] / 1e3:.0f} kB | "
          f"{r['ms']:.2f} | {r['left']} |" for label, r in rows],
    ]
    report = "\n".join(lines) + "\n"
    atomic_write(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
