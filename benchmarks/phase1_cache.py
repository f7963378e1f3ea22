"""Phase 1 with and without the embedding cache: seconds of `train_local` on the same chunks, same seeds.

    python benchmarks/phase1_cache.py                       # tiny (32 px) and DenseNet121 (64 px), weights None
    python benchmarks/phase1_cache.py --backbones tiny      # just the tiny preset

The demo corpus (8 speakers, 3 clips per class, 1 s chunks with a 0.25 s hop: 329 train chunks) is trained for
phase 1 three ways, each on a freshly built, identically initialised model (so every row pays the same tracing):
the full model (``training.embedding_cache: false``), with an empty cache (embeddings computed, then the head
trained) and with the cache filled by the previous row (what every later federated round or central run sees).
``epoch s`` is the median of the epochs after the first (steady state); ``total s`` the whole call. The head
weights of the cached rows are compared with the full model's (max absolute difference).

Writes ``benchmarks/results/phase1_cache.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dsl_fed.config import from_dict  # noqa: E402
from dsl_fed.data.demo import make_demo_corpus  # noqa: E402
from dsl_fed.data.manifest import read_manifest  # noqa: E402
from dsl_fed.data.pipeline import load_chunks  # noqa: E402
from dsl_fed.embedding_cache import EmbeddingCache  # noqa: E402
from dsl_fed.io import atomic_write  # noqa: E402
from dsl_fed.models import build_model, get_weights_by_name  # noqa: E402
from dsl_fed.train import train_local  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "phase1_cache.md"
SIZES = {"tiny": 32, "densenet121": 64, "mobilenet_v2": 64}


def settings(manifest: Path, backbone: str, epochs: int) -> dict:
    return {
        "data": {"manifest": str(manifest), "chunk_seconds": 1.0, "hop_seconds": 0.25},
        "spectrogram": {"image_size": SIZES[backbone], "n_mels": 64},
        "model": {"backbone": backbone, "weights": None, "units": 32, "dropout": 0.1},
        "training": {"optimizer": "adam", "learning_rate": 0.003, "batch_size": 16, "phase1_epochs": epochs},
    }


def measure(backbone: str, manifest: Path, epochs: int, folder: Path) -> list[dict]:
    raw = settings(manifest, backbone, epochs)
    cfg = from_dict(raw)
    plain_cfg = cfg.replace(**{"training.embedding_cache": "false"})
    corpus = read_manifest(manifest)
    chunks = load_chunks(corpus.partition("train"), cfg.data, corpus.classes, progress=False)
    cache = EmbeddingCache(folder / backbone, note=lambda line: None)
    rows, reference = [], None
    for label, run_cfg, use in (("full model (no cache)", plain_cfg, None), ("cache empty (computed)", cfg, cache),
                                ("cache filled (read)", cfg, cache)):
        keras.backend.clear_session()
        model = build_model(run_cfg, len(corpus.classes))
        start = time.perf_counter()
        result = train_local(model, chunks, None, run_cfg, phase=1, verbose=0, cache=use)
        total = time.perf_counter() - start
        weights = get_weights_by_name(model)
        if reference is None:
            reference, diff = weights, None
        else:
            diff = max(float(np.abs(weights[n] - reference[n]).max()) for n in reference)
        seconds = result.history["seconds"]
        rows.append({"backbone": f"{backbone} ({SIZES[backbone]} px)", "variant": label, "chunks": len(chunks),
                     "epochs": epochs, "epoch": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
                     "total": total, "diff": diff})
        print(f"{backbone}: {label}: {total:.1f} s", file=sys.stderr)
    return rows


def render(rows: list[dict], command: str, load: tuple[float, float]) -> str:
    lines = [
        "# Phase 1 with and without the embedding cache",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (the machine is "
        f"shared). Weights None, batch 16, demo corpus train partition. Command: `{command}`.",
        "",
        "| backbone | variant | chunks | epochs | epoch s (median after the 1st) | total s | speed-up (total) | "
        "max abs head weight diff vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for row in rows:
        base.setdefault(row["backbone"], row["total"])
        diff = "-" if row["diff"] is None else f"{row['diff']:.1e}"
        lines.append(f"| {row['backbone']} | {row['variant']} | {row['chunks']} | {row['epochs']} | "
                     f"{row['epoch']:.3f} | {row['total']:.2f} | {base[row['backbone']] / row['total']:.1f}x | {diff} |")
    lines += ["", "Speed-up = full-model seconds / the row's seconds for the whole `train_local` call (tracing "
              "included, as a federated client pays it on its first message)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny", "densenet121"], choices=sorted(SIZES))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo_corpus(Path(tmp) / "corpus", speakers=8, clips=3, seed=0, progress=False)
        rows = [row for backbone in args.backbones for row in measure(backbone, manifest, args.epochs, Path(tmp))]
    command = "python benchmarks/phase1_cache.py " + " ".join(sys.argv[1:])
    atomic_write(RESULTS, render(rows, command.strip(), (load_before, os.getloadavg()[0])))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
