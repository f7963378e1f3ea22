"""The paper's Table 4 for this machine: size, compute, speed and memory of every deployable form of a model.

Rows: (a) the preprocessing alone (the `SpectrogramImage` layer exported to float32 TFLite, as the paper's
separate preprocessor), (b) the Keras model (compiled call and ``model.predict``), (c) the TFLite exports in
float32, float16, dynamic-range and int8 precision, all with raw-audio input.

How each column is measured:
- **params**: Keras rows ``model.count_params()``; TFLite rows count the values stored in the file itself
  (`dsl_fed.litert.count_parameters`: weights, biases and the spectrogram's DFT, Mel and colour tables, with
  BatchNorm folded into a scale and an offset where the converter can);
- **FLOPs**: ``tf.compat.v1.profiler`` float-operation count of the frozen inference graph at batch 1
  (multiply and add counted separately, so MACs = FLOPs / 2; ops without a registered count, e.g. an RFFT,
  count 0 - the STFT here is a convolution, so it is counted);
- **latency**: batch 1, 3 warm-up calls, then the mean and median of `runs` (default 50) calls; Keras runs
  as a compiled ``tf.function`` (its fastest form) and through ``model.predict`` (the everyday API, with
  its per-call overhead), TFLite through the LiteRT interpreter with `threads`;
- **peak memory**: each row is measured in a fresh Python subprocess. After the runtime is imported, the
  current resident set size is read (``/proc/self/statm``); after loading the model and running all calls,
  the peak resident set size (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` elsewhere); the difference
  is the peak memory the model added (weights, allocator arenas, activations).
  ``tracemalloc`` cannot be used: TensorFlow and LiteRT allocate outside the Python heap. The TFLite
  subprocess imports only numpy and ``ai_edge_litert``, as a device app would.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write, check_empty_folder, publish_folder
from dsl_fed.precision import QUANT_LABELS

__all__ = ["StatsRow", "count_flops", "cpu_vector_extensions", "measure", "model_stats", "tflite_row", "stats_table",
           "stats_path"]

RUNS = 50
WARMUP = 3


@dataclass
class StatsRow:
    """One line of the table; None = not applicable / not measured."""

    name: str
    params: int | None
    flops: int | None
    file_bytes: int | None
    mean_ms: float
    median_ms: float
    peak_mb: float
    note: str = ""


# ----------------------------------------------------------------------------------------- measuring


def measure(kind: str, path: str | Path, threads: int, runs: int = RUNS) -> dict[str, float]:
    """Time and memory of one model in a fresh subprocess (see the module docstring).

    Args:
        kind: ``"tflite"`` or ``"keras"``.
        path: The model file.
        threads: Interpreter threads (TFLite) or intra-op threads (TensorFlow).
        runs: Timed calls after `WARMUP` warm-up calls.

    Returns:
        ``{"mean_ms", "median_ms", "peak_mb"}``.
    """
    if kind not in ("tflite", "keras"):
        raise DslFedError(f"unknown model kind {kind!r} (tflite or keras)")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "dsl_fed.stats", kind, str(path), str(threads), str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DslFedError(f"{path}: measurement subprocess failed ({tail})")
    return json.loads(lines[-1])


def _max_rss_mb() -> float:
    """Peak resident set size of this process.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` would be wrong here, because Linux
    carries it over from the parent across fork + exec, so a child of a process holding TensorFlow would
    report the parent's 600 MB as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


def _current_rss_mb() -> float:
    """Resident set size now (Linux /proc); elsewhere the peak so far, which can only under-report growth."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return _max_rss_mb()


def _worker(kind: str, path: str, threads: int, runs: int) -> dict[str, float]:
    """Runs inside the subprocess: import the runtime, note RSS, load + run the model, note the peak."""
    if kind == "tflite":
        import ai_edge_litert.interpreter  # noqa: F401 - imported before the baseline reading

        from dsl_fed.litert import TFLiteRunner

        before = _current_rss_mb()
        runner = TFLiteRunner(path, threads=threads)
        x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
        call = lambda: runner.predict_one(x)  # noqa: E731
    else:
        import keras
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import dsl_fed.models  # noqa: F401 - registers the custom layers for loading

        before = _current_rss_mb()
        model = keras.saving.load_model(path, compile=False)
        x = tf.constant(np.random.default_rng(0).standard_normal((1, *model.input_shape[1:])).astype(np.float32))
        fn = tf.function(lambda v: model(v, training=False))
        call = lambda: fn(x).numpy()  # noqa: E731
    result = time_call(call, runs)
    if kind == "keras":  # also the everyday API, whose per-call overhead the paper's Keras timing includes
        predict = time_call(lambda: model.predict(x, verbose=0), runs)
        result.update(predict_mean_ms=predict["mean_ms"], predict_median_ms=predict["median_ms"])
    result["peak_mb"] = max(0.0, _max_rss_mb() - before)
    return result


def time_call(call: Any, runs: int, warmup: int = WARMUP) -> dict[str, float]:
    """Mean and median milliseconds of `runs` calls after `warmup` untimed ones (first calls build caches)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"mean_ms": float(np.mean(times)), "median_ms": float(np.median(times))}


def count_flops(model: Any, input_shape: Sequence[int]) -> int:
    """Float operations of one batch-1 inference, from the TF profiler on the frozen graph."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *input_shape), tf.float32)
    )
    frozen = convert_variables_to_constants_v2(fn)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


# ----------------------------------------------------------------------------------------------- table


def tflite_row(path: str | Path, threads: int, runs: int = RUNS, name: str | None = None,
               flops: int | None = None, note: str = "") -> StatsRow:
    """Measure one exported model (its quantisation is read from the manifest when present)."""
    from dsl_fed.litert import count_parameters

    path = Path(path)
    if name is None:
        from dsl_fed.export import manifest_path, read_export_manifest

        quant = read_export_manifest(path).quantization if manifest_path(path).is_file() else None
        name = f"TFLite {QUANT_LABELS.get(quant, '')}".strip()
    m = measure("tflite", path, threads, runs)
    return StatsRow(name, count_parameters(path), flops, path.stat().st_size, m["mean_ms"], m["median_ms"],
                    m["peak_mb"], note)


def model_stats(
    model_path: str | Path,
    cfg: Any,
    classes: Sequence[str],
    threads: int = 2,
    runs: int = RUNS,
    representative: Any = None,
    quantizations: Sequence[str] = ("none", "float16", "dynamic", "int8"),
    work_dir: str | Path | None = None,
    repeats: int = 1,
    progress: bool = True,
    model: Any = None,
) -> list[StatsRow]:
    """Measure a saved Keras model and its TFLite exports (Table 4).

    All files are exported first; then every row is measured `repeats` times, the rows interleaved, and the
    repeat with the lowest median latency is kept. On a machine shared with other jobs this keeps one busy
    moment from penalising a single row (the same reason `timeit` reports the best repeat).

    Args:
        model_path: A ``.keras`` file from `build_model` / training.
        cfg: Its `Config` (for the export manifests).
        classes: Class names in output order.
        threads: Threads for every row.
        runs: Timed calls per row and repeat.
        representative: Training chunks for int8 calibration; without them the int8 row is skipped.
        quantizations: Which TFLite precisions to export and measure.
        work_dir: A new (or empty) folder to keep the exports in, filled only once all rows are measured, so
            nothing that was there is overwritten; None = they are deleted afterwards.
        repeats: Interleaved measurement rounds (>= 1).
        progress: Print progress lines to stderr.
        model: The model already loaded from `model_path`, if the caller has it (saves loading it twice).

    Returns:
        Rows in table order.
    """
    import keras

    from dsl_fed.export import convert_keras, export_tflite, split_model
    from dsl_fed.litert import count_parameters
    from dsl_fed.models import load_model

    model_path = Path(model_path)
    if repeats < 1:
        raise DslFedError(f"repeats must be >= 1, got {repeats}")
    if model is None:
        model = load_model(model_path)
    samples = int(model.input_shape[-1])
    params = int(model.count_params())
    flops = count_flops(model, (samples,))
    spectrogram, _ = split_model(model)

    def say(text: str) -> None:
        if progress:
            print(f"stats: {text}", file=sys.stderr, flush=True)

    if work_dir is not None:
        check_empty_folder(Path(work_dir), "--keep-exports folder")
    with tempfile.TemporaryDirectory(prefix="dsl_fed_stats_") as tmp:
        out = Path(tmp)
        # (row name, kind, file, params, flops, note); None as kind = skipped
        jobs: list[tuple[str, str | None, Path | None, int, int, str]] = []
        say("exporting the preprocessing alone")
        waveform = keras.Input((samples,), name="waveform")
        pre_model = keras.Model(waveform, spectrogram(waveform), name="preprocessing")
        pre_path = atomic_write(out / "preprocessing" / "preprocessing.tflite", convert_keras(pre_model, (samples,)))
        jobs.append(("preprocessing (TFLite fp32)", "tflite", pre_path, count_parameters(pre_path),
                     count_flops(pre_model, (samples,)), "SpectrogramImage alone"))
        jobs.append(("Keras model", "keras", model_path, params, flops, "compiled tf.function call, raw audio in"))
        for quant in quantizations:
            label = QUANT_LABELS[quant]
            if quant == "int8" and representative is None:
                jobs.append((f"TFLite {label}", None, None, None, flops, "skipped: no training chunks to calibrate"))
                continue
            say(f"exporting TFLite {label}")
            path = export_tflite(model, out / label / "model.tflite", quant, "audio",
                                 representative=representative if quant == "int8" else None, classes=classes, cfg=cfg)
            jobs.append((f"TFLite {label}", "tflite", path, count_parameters(path), flops, "raw audio in"))

        best: dict[str, dict[str, float]] = {}
        for r in range(repeats):
            for name, kind, path, *_ in jobs:
                if kind is None:
                    continue
                say(f"measuring {name} ({r + 1}/{repeats})")
                m = measure(kind, path, threads, runs)
                if name not in best or m["median_ms"] < best[name]["median_ms"]:
                    best[name] = m
                if kind == "keras":  # model.predict is timed in the same process: keep its best separately
                    key = "Keras model.predict"
                    if key not in best or m["predict_median_ms"] < best[key]["median_ms"]:
                        best[key] = {"mean_ms": m["predict_mean_ms"], "median_ms": m["predict_median_ms"],
                                     "peak_mb": m["peak_mb"]}

        rows = []
        nan = float("nan")
        for name, kind, path, row_params, row_flops, note in jobs:
            if kind is None:
                rows.append(StatsRow(name, row_params, row_flops, None, nan, nan, nan, note))
                continue
            m = best[name]
            size = path.stat().st_size
            rows.append(StatsRow(name, row_params, row_flops, size, m["mean_ms"], m["median_ms"], m["peak_mb"], note))
            if kind == "keras":
                p = best["Keras model.predict"]
                rows.append(StatsRow("Keras model.predict", row_params, row_flops, size, p["mean_ms"], p["median_ms"],
                                     p["peak_mb"], "same model through model.predict (per-call overhead)"))
        if work_dir is not None:
            publish_folder(Path(work_dir), lambda staging: shutil.copytree(out, staging, dirs_exist_ok=True))
    return rows


def stats_table(rows: Sequence[StatsRow], threads: int, runs: int = RUNS, title: str = "", repeats: int = 1) -> str:
    """Markdown table of `rows` with a header saying how it was measured."""
    header = title or "Model statistics (Table 4 analogue)"
    lines = [
        f"### {header}",
        "",
        f"Batch 1, {threads} thread(s), mean/median over {runs} runs after {WARMUP} warm-up calls"
        + (f", best of {repeats} interleaved repeats" if repeats > 1 else "")
        + f"; machine: {cpu_name()}, {os.cpu_count()} logical CPU(s), "
        f"vector extensions {', '.join(cpu_vector_extensions()) or 'unknown'}.",
        "",
        "| model | params | FLOPs | file size | mean latency [ms] | median latency [ms] | peak memory [MB] | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_count(r.params)} | {_count(r.flops)} | {_size(r.file_bytes)} | {_ms(r.mean_ms)} | "
            f"{_ms(r.median_ms)} | {_ms(r.peak_mb)} | {r.note} |"
        )
    lines += [
        "",
        "Params: Keras rows count the model's weights; TFLite rows count the values stored in the file (weights, "
        "biases, the spectrogram's DFT, Mel and colour tables; BatchNorm folded where possible). "
        "FLOPs: TF profiler float ops of the frozen graph (MACs = FLOPs / 2). Peak memory: "
        "peak resident set size (VmHWM) of a fresh process after loading and running the model, minus its "
        "resident size right after importing the runtime.",
    ]
    return "\n".join(lines) + "\n"


def stats_path(model_path: str | Path) -> Path:
    """Where `dsl_fed stats` writes the table: ``<model stem>_stats.md`` beside the model."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}_stats.md")


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _ms(v: float) -> str:
    return "–" if v != v else f"{v:.2f}" if v < 10 else f"{v:.1f}"  # v != v: NaN


def cpu_vector_extensions() -> list[str]:
    """The x86 vector extensions that decide which XNNPACK kernels run (int8 speed depends on VNNI)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    known = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16")
    return [f for f in known if f in flags]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":  # the measurement subprocess: python -m dsl_fed.stats KIND PATH THREADS RUNS
    print(json.dumps(_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
