"""On-device budget: what the trainable .tflite costs a phone-like CPU, and a LiteRT client's memory beside a Keras one.

Run:  python benchmarks/on_device.py [--presets tiny,densenet121] [--threads 1] [--repeats 20]
Writes benchmarks/results/on_device.md and prints it.

Per preset - ``tiny`` (configs/quickstart.yaml) and ``densenet121`` (configs/paper/ccs.yaml: DenseNet121 at
224 px, 3 s chunks, 512 units, AdaDelta) - a model is built with random weights (``model.weights: null``: the
ImageNet weights cannot be downloaded here, and no timing depends on weight values) and exported with
``dsl_fed export MODEL.keras --trainable``. Measured with LiteRT alone (`TrainableRunner`):

- the trainable file's size;
- ms per ``embed`` call on one chunk (batch 1, the phone's streaming case) and per ``train`` step at each
  ``--batches`` size: median over ``--repeats`` calls after ``WARMUP`` calls;
- peak resident set size of one phase-1 round of one node, run twice in fresh processes on the same clips,
  epochs, seed and head weights: the LiteRT worker a LiteRT node starts (``python -m
  dsl_fed.federated.litert_runtime``: decode, ``embed`` once, ``train`` for the round's local epochs, ``infer``)
  and a Keras process doing what the Keras client does in that round (`train_local` on embeddings, then the
  train UAR through the head). Neither loads Flower. Peak RSS is the child's own ``VmHWM`` (Linux), read in
  the child as it ends (`PEAK_WRAPPER`): ``ru_maxrss`` from `os.wait4` would include this parent's peak,
  which Linux carries over across fork + exec. Beside them: the peak RSS of a process that only imports
  each runtime.

Both runtimes get ``--threads`` threads (LiteRT's interpreter; TensorFlow's intra- and inter-op pools). Timings
are wall-clock on a possibly shared machine: the report records the 1-minute load average at start and end
and the CPU's vector extensions (XNNPACK picks its kernels from them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PRESETS = {  # name -> (config file, overrides); model.weights null everywhere (see the module docstring)
    "tiny": (REPO / "configs" / "quickstart.yaml", []),
    "densenet121": (REPO / "configs" / "paper" / "ccs.yaml",
                    # SapAugment is refused for LiteRT clients and keeps the Keras client off embeddings
                    ["augment.cutmix=false", "augment.specaugment=false"]),
}
WARMUP = 2
NODE = {"partition-id": 0, "num-partitions": 2}  # the measured node: half of the corpus' train speakers
ROUND_SEED = 1  # server round of the measured round (its (round, node) seed orders the batches)
FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "flwr")
IMPORTS = {"LiteRT": "import numpy, ai_edge_litert.interpreter",
           "Keras": "import numpy, tensorflow, keras"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,densenet121", help="comma-separated, from: " + ", ".join(PRESETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median reported)")
    parser.add_argument("--batches", default="8,32", help="train batch sizes")
    parser.add_argument("--keep", type=Path, default=None, help="keep the corpus, models and exports here")
    parser.add_argument("--out", type=Path, default=RESULTS / "on_device.md")
    parser.add_argument("--keras-round", type=Path, default=None, help=argparse.SUPPRESS)  # the Keras worker
    args = parser.parse_args()
    if args.keras_round is not None:
        keras_round(args.keras_round)
        return 0
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    batches = tuple(int(b) for b in args.batches.split(","))
    from dsl_fed.io import atomic_write

    load_start, started = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="dsl_fed_on_device_") as tmp:
        work = args.keep or Path(tmp)
        manifest = demo_corpus(work)
        results = [measure_preset(p, preset_config(p, manifest), work / p, args.threads, args.repeats, batches)
                   for p in presets]
        imports = import_rss()
    run = {"command": " ".join(["python benchmarks/on_device.py", *sys.argv[1:]]), "threads": args.threads,
           "repeats": args.repeats, "load_start": load_start, "load_end": os.getloadavg()[0],
           "minutes": (time.time() - started) / 60, "imports": imports}
    report = render(results, run)
    target = atomic_write(args.out, report)
    print(report)
    print(f"written to {target}", file=sys.stderr)
    return 0


def log(text: str) -> None:
    print(f"[on_device] {text}", file=sys.stderr, flush=True)


def demo_corpus(work: Path) -> Path:
    """The test suite's demo corpus in `work` (made once): 8 speakers, 4 of them train, 3 classes."""
    from dsl_fed.data.demo import make_demo_corpus

    manifest = work / "demo" / "manifest.csv"
    if not manifest.is_file():
        manifest = make_demo_corpus(work / "demo", speakers=8, clips=3, seed=0, progress=False)
    return manifest


def preset_config(name: str, manifest: Path, overrides: list[str] | tuple[str, ...] = ()):
    """The preset's config on `manifest`, random init, the measured node's federation size, 1 CPU per client."""
    from dsl_fed.config import load_config

    path, own = PRESETS[name]
    return load_config(path, [*own, f"data.manifest={manifest}", "model.weights=null",
                              f"data.shards={NODE['num-partitions']}", "federated.client_cpus=1", *overrides])


# ---------------------------------------------------------------------------------------------- measuring


def measure_preset(name: str, cfg, work: Path, threads: int, repeats: int, batches: tuple[int, ...] = (8, 32)) -> dict:
    """Everything the report says about one preset: model facts, file size, timings, the round's peak RSS.

    `work` receives ``model.keras``, ``config.yaml``, ``tflite_trainable/`` and one folder per round process.
    """
    from dsl_fed.data import read_manifest

    classes = list(read_manifest(cfg.data.manifest).classes)
    log(f"{name}: building {cfg.model.backbone} ({cfg.spectrogram.image_size} px) and exporting it trainable")
    model_path, path = export_trainable_model(cfg, classes, work)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    log(f"{name}: timing embed and train ({repeats} calls each, {threads} thread(s))")
    timing = time_signatures(path, threads, repeats, batches)
    log(f"{name}: one round of node {NODE['partition-id']}, LiteRT process then Keras process")
    rounds = {"LiteRT": round_process("litert", cfg, classes, model_path, path, work / "round_litert", threads),
              "Keras": round_process("keras", cfg, classes, model_path, path, work / "round_keras", threads)}
    return {
        "preset": name, "backbone": cfg.model.backbone, "image_size": cfg.spectrogram.image_size,
        "chunk_seconds": cfg.data.chunk_seconds, "sample_rate": cfg.data.sample_rate,
        "samples": manifest["input_shape"][0],
        "classes": len(classes), "bottleneck_dim": manifest["bottleneck_dim"], "units": cfg.model.units,
        "optimizer": manifest["optimizer"]["name"], "weights": cfg.model.weights, "batch_size": cfg.training.batch_size,
        "local_epochs": cfg.federated.local_epochs, "tflite": str(path), "tflite_bytes": path.stat().st_size,
        "threads": threads, "repeats": repeats, **timing, "rounds": rounds,
    }


def export_trainable_model(cfg, classes: list[str], work: Path) -> tuple[Path, Path]:
    """A random-init model of `cfg` in a run folder, exported by ``dsl_fed export MODEL.keras --trainable``."""
    from dsl_fed.cli import main as cli
    from dsl_fed.io import atomic_write
    from dsl_fed.models import build_model

    model_path = work / "model.keras"
    path = work / "tflite_trainable" / "model.tflite"
    if path.is_file():  # --keep: a second run reuses the export
        return model_path, path
    work.mkdir(parents=True, exist_ok=True)
    build_model(cfg, len(classes)).save(model_path)
    atomic_write(work / "config.yaml", cfg.to_yaml())
    if cli(["export", str(model_path), "--trainable"]) != 0:
        raise SystemExit(f"dsl_fed export {model_path} --trainable failed")
    return model_path, path


def time_signatures(path: Path, threads: int, repeats: int, batches: tuple[int, ...]) -> dict:
    """Median ms of ``embed`` on one chunk and of one ``train`` step per batch size, LiteRT with `threads`."""
    from dsl_fed.litert_training import TrainableRunner
    from dsl_fed.stats import time_call

    runner = TrainableRunner(path, threads=threads, seed=0)
    rng = np.random.default_rng(0)
    chunk = rng.uniform(-0.5, 0.5, (1, runner.samples)).astype(np.float32)
    embed_ms = time_call(lambda: runner.embed(chunk), repeats, WARMUP)["median_ms"]
    train_ms = {}
    for batch in batches:
        x = rng.standard_normal((batch, runner.bottleneck_dim)).astype(np.float32)
        y = rng.integers(0, runner.num_classes, batch).astype(np.int32)
        train_ms[batch] = time_call(lambda: runner.train(x, y), repeats, WARMUP)["median_ms"]
    return {"embed_ms": embed_ms, "train_ms": train_ms}


def round_process(runtime: str, cfg, classes: list[str], model_path: Path, tflite: Path, folder: Path,
                  threads: int) -> dict:
    """One node's phase-1 round in a fresh process of `runtime`; its reply plus peak RSS and wall time.

    Both get the same request (`dsl_fed.federated.litert_client.handle`'s fields) and the model's head weights
    by Keras name; each keeps its embeddings in a fresh cache folder of its own, so each embeds its clips once
    (as a node with its embedding cache does).
    """
    from dsl_fed.federated import litert_runtime
    from dsl_fed.federated.litert_client import worker_command
    from dsl_fed.federated.node_identity import client_seed
    from dsl_fed.litert_training import TrainableRunner

    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: w["path"] for key, w in json.loads((tflite.parent / "manifest.json").read_text())["weights"].items()}
    head = {paths[key]: value for key, value in TrainableRunner(tflite).parameters().items()}  # by Keras name
    request = {
        "kind": "train", "config": cfg.to_dict(), "node_config": dict(NODE), "classes": classes,
        "model": str(tflite), "model_sha256": "benchmark", "keras_model": str(model_path), "threads": threads,
        "cache": str(folder / "cache"), "partition": NODE["partition-id"],
        "seed": client_seed(cfg.training.seed, ROUND_SEED, NODE["partition-id"]), "epochs": cfg.federated.local_epochs,
        "parts": ["devel"],
    }
    for name in (litert_runtime.REPLY, litert_runtime.REPLY_WEIGHTS):
        (folder / name).unlink(missing_ok=True)
    (folder / litert_runtime.REQUEST).write_text(json.dumps(request))
    np.savez(folder / litert_runtime.WEIGHTS, **head)
    if runtime == "litert":
        command = worker_command(folder)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--keras-round", str(folder)]
    peak, seconds, code = _peak_rss(command, _env(threads), folder / "stderr.txt")
    reply_path = folder / litert_runtime.REPLY
    if code != 0 or not reply_path.is_file():
        lines = [line for line in (folder / "stderr.txt").read_text().splitlines() if line.strip()]
        raise SystemExit(f"{runtime} round process failed (exit {code}): {lines[-1] if lines else 'no output'}")
    reply = json.loads(reply_path.read_text())
    if "error" in reply:
        raise SystemExit(f"{runtime} round process: {reply['error']}")
    return {"peak_rss_bytes": peak, "seconds": seconds, "frameworks": reply["frameworks"],
            "num_examples": reply["metrics"]["num-examples"], "train_loss": reply["metrics"]["train-loss"]}


def _env(threads: int) -> dict[str, str]:
    """A child's environment: this checkout's dsl_fed first, `threads` OpenMP threads."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(threads)}


# Runs the command given after it (``-m MODULE ARGS`` or ``SCRIPT ARGS``) in this process via runpy, then writes
# the process's VmHWM (bytes) to the file named first. Read in the child because Linux carries ru_maxrss over
# from the parent across fork/vfork + exec: os.wait4 would report this TensorFlow-holding parent's peak.
PEAK_WRAPPER = """
import runpy, sys
from pathlib import Path
out, target = sys.argv[1], sys.argv[2:]
module = target[0] == "-m"
sys.argv = target[1:] if module else target  # run_module puts the module's file in argv[0]
try:
    if module:
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(target[0]).resolve().parent))
        runpy.run_path(target[0], run_name="__main__")
finally:
    status = Path("/proc/self/status").read_text().splitlines()
    Path(out).write_text(str(1024 * int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))))
"""


def _peak_rss(command: list[str], env: dict[str, str], stderr: Path) -> tuple[int, float, int]:
    """``(peak RSS in bytes, wall seconds, exit code)`` of `command` (``python ...``) run to its end in a fresh process.

    The peak is the process's own ``VmHWM`` (Linux), written by `PEAK_WRAPPER` as the command ends.
    """
    assert command[0] == sys.executable, command
    peak_file = stderr.with_name(stderr.stem + "_peak")
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(stderr, "w") as err:
        code = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak_file), *command[1:]], env=env,
                              stdout=subprocess.DEVNULL, stderr=err, check=False).returncode
    seconds = time.perf_counter() - start
    return (int(peak_file.read_text()) if peak_file.is_file() else 0), seconds, code


def import_rss() -> dict[str, int]:
    """Peak RSS of a fresh process that only imports each runtime (the floor under the round's figure)."""
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="dsl_fed_on_device_imports_") as tmp:
        for runtime, statement in IMPORTS.items():
            script = Path(tmp) / "imports.py"
            script.write_text(statement + "\n")
            peak, _, code = _peak_rss([sys.executable, str(script)], _env(1), Path(tmp) / "stderr.txt")
            if code != 0:
                raise SystemExit(f"python -c {statement!r} failed (exit {code})")
            peaks[runtime] = peak
    return peaks


def keras_round(folder: Path) -> None:
    """The Keras side of `round_process`: the Keras client's phase-1 work on the request's node, no Flower.

    As `dsl_fed.federated.keras_client.train`: TensorFlow's thread pools sized first, the node's chunks, the
    full model with the server's head, `train_local` phase 1 for the round's epochs with the (round, node) seed
    and the node's embedding cache, then the train UAR through the head on the cached embeddings.
    """
    import tensorflow as tf

    from dsl_fed.bottleneck import bottleneck_applies, predict_clips_on_embeddings
    from dsl_fed.config import from_dict
    from dsl_fed.data import load_chunks
    from dsl_fed.data.nodes import node_data
    from dsl_fed.embedding_cache import for_config
    from dsl_fed.federated import litert_runtime
    from dsl_fed.metrics import uar
    from dsl_fed.models import load_model, set_weights_by_name
    from dsl_fed.train import train_local

    request = json.loads((folder / litert_runtime.REQUEST).read_text())
    threads = int(request["threads"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    cfg = from_dict(request["config"])
    clips = node_data(request["node_config"], cfg.data, request["classes"]).clips["train"]
    chunks = load_chunks(clips, cfg.data, request["classes"], progress=False)
    model = load_model(request["keras_model"])
    with np.load(folder / litert_runtime.WEIGHTS) as stored:
        set_weights_by_name(model, {name: stored[name] for name in stored.files})
    applies, why_not = bottleneck_applies(model, cfg, 1)
    if not applies:  # the LiteRT node trains on embeddings; a Keras process through the backbone does other work
        (folder / litert_runtime.REPLY).write_text(json.dumps({"error": f"phase 1 not on embeddings: {why_not}"}))
        return
    cache = for_config(request["cache"], cfg)
    start = time.perf_counter()
    result = train_local(model, chunks, None, cfg, 1, epochs=int(request["epochs"]), verbose=0,
                         seed=int(request["seed"]), cache=cache)
    seconds = time.perf_counter() - start
    _, probs, labels, _ = predict_clips_on_embeddings(model, chunks, cfg, 1, cache)
    metrics = {"num-examples": len(chunks), "train-loss": float(result.loss),
               "train-uar": float(uar(labels, probs.argmax(axis=1))), "train-seconds": seconds}
    reply = {"metrics": metrics, "frameworks": [n for n in FRAMEWORKS if n in sys.modules], "pid": os.getpid()}
    (folder / litert_runtime.REPLY).write_text(json.dumps(reply))


# ---------------------------------------------------------------------------------------------- report


def cpu_line() -> str:
    """CPU model, logical CPUs and the vector extensions XNNPACK chooses its kernels by."""
    from dsl_fed.stats import cpu_name, cpu_vector_extensions

    return (f"{cpu_name()}, {os.cpu_count()} logical CPU(s), vector extensions "
            f"{', '.join(cpu_vector_extensions()) or 'none reported'}")


def versions() -> str:
    """The runtimes' versions (TensorFlow's distribution is named tensorflow or tensorflow-cpu, so ask the modules)."""
    import ai_edge_litert
    import keras
    import tensorflow as tf

    return f"ai-edge-litert {ai_edge_litert.__version__}, TensorFlow {tf.__version__}, Keras {keras.__version__}"


def render(results: list[dict], run: dict) -> str:
    """The results file: header facts from the run, one table of costs, one of the round's memory."""
    batches = list(results[0]["train_ms"])
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    lines = [
        "# On-device budget: the trainable .tflite on this CPU, and a LiteRT client's memory beside a Keras one",
        "",
        f"Command: `{run['command']}` · {run['minutes']:.1f} min · 1-min load average {run['load_start']:.2f} at "
        f"start, {run['load_end']:.2f} at end · CPU: {cpu_line()} · {versions()} · "
        f"{run['threads']} thread(s) for LiteRT and for TensorFlow · timings are medians of {run['repeats']} calls "
        f"after {WARMUP} warm-up calls.",
        "",
        "Initial weights: " + "; ".join(
            f"{r['preset']} " + ("random (`model.weights: null`)" if r["weights"] is None else f"`{r['weights']}`")
            for r in results) + ". The ImageNet weights cannot be downloaded here, and no timing depends on weight "
        "values. Each model is exported with `dsl_fed export MODEL.keras --trainable`.",
        "",
        "| preset | backbone | input | classes | bottleneck → units | optimizer | trainable .tflite | "
        "`embed` ms / chunk (batch 1) | " + " | ".join(f"`train` ms / step, batch {b}" for b in batches) + " |",
        "|---|---|---|---:|---|---|---:|---:|" + "---:|" * len(batches),
    ]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['backbone']} | {r['image_size']}×{r['image_size']} px, {r['chunk_seconds']:g} s "
            f"({r['samples']} samples) | {r['classes']} | {r['bottleneck_dim']} → {r['units']} | {r['optimizer']} | "
            f"{mb(r['tflite_bytes'])} | {r['embed_ms']:.1f} | "
            + " | ".join(f"{r['train_ms'][b]:.2f}" for b in batches) + " |")
    lines += [
        "",
        f"One phase-1 round of node {NODE['partition-id']} of {NODE['num-partitions']} (the demo corpus' train "
        f"speakers in {NODE['num-partitions']} shards), each runtime in one fresh process with the same clips, head "
        "weights, seed and epochs, each embedding its clips once; peak RSS is the process's own `VmHWM`, read as it "
        "ends. LiteRT: the worker a LiteRT node starts (`python -m dsl_fed.federated.litert_runtime`); Keras: the "
        "Keras client's calls (`train_local` on embeddings, then the train UAR); neither loads Flower. Wall time is "
        "the whole process: start-up, imports, decoding, embedding, training.",
        "",
        "| preset | process | chunks × epochs (batch) | frameworks loaded | peak RSS | wall s |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        for runtime, p in r["rounds"].items():
            frameworks = ", ".join(p["frameworks"]) or "none of " + "/".join(FRAMEWORKS)
            lines.append(f"| {r['preset']} | {runtime} | {p['num_examples']} × {r['local_epochs']} "
                         f"({r['batch_size']}) | {frameworks} | "
                         f"{mb(p['peak_rss_bytes'])} | {p['seconds']:.1f} |")
    for r in results:
        ratio = r["rounds"]["Keras"]["peak_rss_bytes"] / r["rounds"]["LiteRT"]["peak_rss_bytes"]
        lines.append(f"\n{r['preset']}: the Keras process peaks at {ratio:.1f}× the LiteRT process.")
    imports = run["imports"]
    lines += ["", "Floor: a fresh process that only imports the runtime peaks at "
              + "; ".join(f"{mb(peak)} for {name} (`{IMPORTS[name]}`)" for name, peak in imports.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
