"""Screen what a client sends at one client per speaker: local epochs (FedAvg) or one gradient (FedSGD)?

    python benchmarks/local_update_screen.py --work DIR [--seeds 3] [--jobs 2] [--only NAME ...]

A fast algorithm-level screen on the arousal corpus of `benchmarks/parity.py` (same folder layout): every
chunk's spectrogram image is computed once with the project's front end, then the project's classifier (the
tiny preset of `configs/arousal.yaml`) is trained on the images by a small loop that plays central training,
FedAvg and FedSGD with a server Adam (bias-corrected like `SliceFedAdam`, restarted at the phase change) over the 36 one-speaker clients. No
Flower, no audio decoding per round: a 200-round run takes well under a minute, so schedules and seeds can be
compared before the real pipeline (`benchmarks/parity.py`) measures the chosen one. Scored on the devel and
test clips every `EVERY` rounds (every epoch for central); each cell is the mean over seeds of the best devel
evaluation's devel UAR and the test UAR of that same evaluation. Writes
``benchmarks/results/local_update_screen.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "arousal.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "local_update_screen.md"
EVERY = 5  # federated rounds between evaluations

# name -> (mode, settings): "central" | "train" (local epochs, client Adam restarted every round, as the Keras
# client) | "gradient" (one gradient over all the client's clips); K clients per round (0 = all), rounds, server
SCREEN: dict[str, tuple[str, dict]] = {
    "central, 1 + 15 epochs": ("central", {"epochs": 15}),
    "fedavg, 2 local epochs, all 36, 1 + 10 rounds": ("train", {"epochs": 2, "K": 0, "rounds": 10, "server": "mean"}),
    "client SGD 0.1, 2 local epochs, 8 of 36, fedadam 0.003, 100 rounds": (
        "train", {"epochs": 2, "K": 8, "rounds": 100, "server": "adam", "eta": 0.003, "client_sgd": 0.1}),
    "fedsgd, 4 of 36, fedadam 0.01, 200 rounds": ("gradient", {"K": 4, "rounds": 200, "eta": 0.01}),
    "fedsgd, 8 of 36, fedadam 0.01, 200 rounds": ("gradient", {"K": 8, "rounds": 200, "eta": 0.01}),
    "fedsgd, 8 of 36, fedadam 0.02, 200 rounds": ("gradient", {"K": 8, "rounds": 200, "eta": 0.02}),
    "fedsgd, 16 of 36, fedadam 0.01, 150 rounds": ("gradient", {"K": 16, "rounds": 150, "eta": 0.01}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder holding (or receiving) arousal<N>/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    parser.add_argument("--only", nargs="*", default=list(SCREEN), help="rows to run (default all)")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(SCREEN))
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {list(SCREEN)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from parity import arousal_corpus  # a sibling script: benchmarks/ is sys.path[0]

    work = args.work.resolve()
    manifest_path, manifest = arousal_corpus(work, args.speakers)
    load = os.getloadavg()[0]
    started = time.time()
    images = work / f"arousal{args.speakers}-images.npz"
    if not images.is_file():
        _images(manifest_path, images)
    jobs = [(name, seed) for name in args.only for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(run, images, *SCREEN[job[0]], job[1]) for job in jobs}
        results = {}
        for done, (job, future) in enumerate(futures.items(), 1):
            results[job] = future.result()
            print(f"[{done}/{len(jobs)}] {job[0]}, seed {job[1]}: devel {results[job]['devel']:.3f} "
                  f"test {results[job]['test']:.3f} in {results[job]['seconds']:.0f} s", flush=True)
    report = render(results, args, manifest, started, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def _images(manifest_path: Path, out: Path) -> None:
    """Every chunk's spectrogram image, label, clip and speaker per partition, computed once."""
    sys.path.insert(0, str(ROOT))
    from dsl_fed.config import load_config
    from dsl_fed.data import load_chunks, read_manifest
    from dsl_fed.io import atomic_write
    from dsl_fed.models import build_model

    cfg = load_config(CONFIG, [f"data.manifest={manifest_path}"])
    manifest = read_manifest(cfg.data.manifest, seed=cfg.data.seed)
    spectrogram = build_model(cfg, len(manifest.classes)).spectrogram
    arrays = {}
    for part in ("train", "devel", "test"):
        chunks = load_chunks(manifest.partition(part), cfg.data, manifest.classes, progress=False)
        arrays[f"{part}_x"] = np.concatenate([spectrogram(chunks.waveforms[i:i + 256]).numpy()
                                              for i in range(0, len(chunks), 256)])
        arrays.update({f"{part}_y": chunks.labels, f"{part}_clip": chunks.clip_ids, f"{part}_speaker": chunks.speakers})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(out, buffer.getvalue())


def run(images: Path, mode: str, settings: dict, seed: int) -> dict:
    """One run in a fresh process (its own TensorFlow, one thread): the best devel evaluation and its test UAR."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running in this process (a test calls `run` directly): keep its threads
        pass
    sys.path.insert(0, str(ROOT))
    from dsl_fed.class_balance import class_weights
    from dsl_fed.config import load_config
    from dsl_fed.metrics import uar
    from dsl_fed.models import build_model, set_phase

    start = time.perf_counter()
    data = dict(np.load(images))
    cfg = load_config(CONFIG, ["data.manifest=unused.csv", f"training.seed={seed}"])
    num_classes = int(data["train_y"].max()) + 1
    model = build_model(cfg, num_classes)
    classifier = model.classifier
    rng = np.random.default_rng(seed)
    lr, batch = cfg.training.learning_rate, cfg.training.batch_size

    def weights_of(y):
        table = class_weights(y, num_classes)
        return np.array([table[int(k)] for k in y], np.float32)

    def score() -> dict[str, float]:
        out = {}
        for part in ("devel", "test"):
            probs = classifier.predict(data[f"{part}_x"], batch_size=256, verbose=0)
            clips = data[f"{part}_clip"]
            ids = np.unique(clips)
            predicted = [probs[clips == c].mean(axis=0).argmax() for c in ids]
            out[part] = uar(np.array([data[f"{part}_y"][clips == c][0] for c in ids]), np.array(predicted))
        return out

    opt = _Optimisers(classifier, lr)

    def local_epochs(x, y, w, epochs, client_sgd):
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for i in range(0, len(x), batch):
                b = order[i:i + batch]
                grads = opt.gradient(x[b], y[b], w[b])
                opt.sgd(grads, client_sgd) if client_sgd else opt.adam(grads)

    curve = []
    if mode == "central":
        x, y = data["train_x"], data["train_y"]
        w = weights_of(y)
        for phase, epochs in ((1, 1), (2, settings["epochs"])):
            set_phase(model, phase, cfg.training.unfrozen_layers)
            opt.phase()
            for _ in range(epochs):
                local_epochs(x, y, w, 1, None)
                curve.append(score())
    else:
        speakers = data["train_speaker"]
        clients = []
        for s in np.unique(speakers):
            y = data["train_y"][speakers == s]
            clients.append((data["train_x"][speakers == s], y, weights_of(y)))
        counts = np.array([len(c[1]) for c in clients], float)
        server = _Adam(settings.get("eta", 0.01))  # FedAdam: Adam on the mean update
        for phase, rounds in ((1, 1), (2, settings["rounds"])):
            set_phase(model, phase, cfg.training.unfrozen_layers)
            opt.phase()
            server.start()
            for rnd in range(1, rounds + 1):
                k = settings.get("K", 0) or len(clients)
                picked = rng.choice(len(clients), k, replace=False) if k < len(clients) else range(len(clients))
                before = opt.get()
                mean = [np.zeros_like(v) for v in before]
                total = counts[list(picked)].sum()
                for i in picked:
                    x, y, w = clients[i]
                    opt.set(before)
                    if mode == "gradient":
                        moved = [b - g.numpy() for b, g in zip(before, opt.gradient(x, y, w))]
                    else:
                        opt.start()
                        local_epochs(x, y, w, settings["epochs"], settings.get("client_sgd"))
                        moved = opt.get()
                    for m, b, a in zip(mean, before, moved):
                        m += counts[i] / total * (a - b)
                step = mean if settings.get("server", "adam") == "mean" else server.step(mean)
                opt.set([b + s for b, s in zip(before, step)])
                if phase == 1 or rnd % EVERY == 0 or rnd == rounds:
                    curve.append(score())
    best = int(np.argmax([c["devel"] for c in curve]))
    return {"devel": curve[best]["devel"], "test": curve[best]["test"], "best": best,
            "seconds": time.perf_counter() - start}


class _Optimisers:
    """Gradient of the class-weighted loss on a batch of images, and Adam / plain SGD steps on the classifier's
    trainable weights (Adam restarted by `start`: the Keras client restarts its optimiser)."""

    def __init__(self, classifier, lr: float):
        self.classifier = classifier
        self._adam = _Adam(lr)

    def phase(self) -> None:
        """After `set_phase`: trace the gradient of the phase's trainable weights and start the optimiser."""
        import keras
        import tensorflow as tf

        variables = self.variables = self.classifier.trainable_variables
        classifier = self.classifier

        def gradient(x, y, w):
            with tf.GradientTape() as tape:
                probs = classifier(x, training=True)
                one_hot = tf.one_hot(y, probs.shape[-1])
                loss = tf.reduce_mean(keras.losses.categorical_crossentropy(one_hot, probs) * w)
            return tape.gradient(loss, variables)

        self._gradient = tf.function(gradient, reduce_retracing=True)
        self.start()

    def start(self) -> None:
        self._adam.start()

    def gradient(self, x, y, w):
        return self._gradient(x, y.astype(np.int32), w)

    def adam(self, grads) -> None:
        for var, step in zip(self.variables, self._adam.step([g.numpy() for g in grads])):
            var.assign(var.numpy() - step)

    def sgd(self, grads, lr) -> None:
        for var, g in zip(self.variables, grads):
            var.assign(var.numpy() - lr * g.numpy())

    def get(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.variables]

    def set(self, values) -> None:
        for var, value in zip(self.variables, values):
            var.assign(value)


class _Adam:
    """Keras' bias-corrected Adam update with central's beta_2 and epsilon, as the step along `direction`: the
    clients' optimiser (on gradients) and the server's FedAdam (on the mean update, as `SliceFedAdam`)."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.start()

    def start(self) -> None:
        self.m = self.v = None
        self.t = 0

    def step(self, direction: list[np.ndarray]) -> list[np.ndarray]:
        if self.m is None:
            self.m = [np.zeros_like(d) for d in direction]
            self.v = [np.zeros_like(d) for d in direction]
        self.t += 1
        a = self.lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        out = []
        for m, v, d in zip(self.m, self.v, direction):
            m *= self.b1
            m += (1 - self.b1) * d
            v *= self.b2
            v += (1 - self.b2) * d * d
            out.append(a * m / (np.sqrt(v) + self.eps))
        return out


def render(results: dict, args, manifest, started: float, load: float) -> str:
    seeds = sorted({seed for _, seed in results})
    classes = len(manifest.classes)
    central = [run for (name, _), run in results.items() if SCREEN[name][0] == "central"]
    lines = [
        "# What a client sends at one client per speaker: local epochs or one gradient",
        "",
        f"`python benchmarks/local_update_screen.py --work DIR --seeds {args.seeds}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} ({time.time() - started:.0f} s; 1-min load "
        f"{load:.1f} at the start). Corpus: eSpeak NG arousal, "
        f"{'/'.join(str(len(manifest.speakers(p))) for p in ('train', 'devel', 'test'))} train / devel / test "
        f"speakers, {classes} classes (chance {1 / classes:.3f}); federated rows: {len(manifest.speakers('train'))} "
        f"clients, one speaker each. The tiny preset of `configs/arousal.yaml` trained on precomputed images by this "
        f"script's own loop (not the Flower pipeline: `benchmarks/parity.py` measures that); seeds "
        f"{', '.join(map(str, seeds))}. Each cell: mean over seeds of the best devel evaluation (every epoch, every "
        f"{EVERY} rounds) and the test UAR of that evaluation.",
        "",
        "| schedule | devel | test | devel - central | test - central | per seed devel / test |",
        "|---|---|---|---|---|---|",
    ]
    reference = {p: np.mean([r[p] for r in central]) for p in ("devel", "test")} if central else None
    for name in SCREEN:
        runs = [results[name, s] for s in seeds if (name, s) in results]
        if not runs:
            continue
        devel, test = np.mean([r["devel"] for r in runs]), np.mean([r["test"] for r in runs])
        gaps = [f"{100 * (value - reference[p]):+.1f} points" if reference else "-"
                for p, value in (("devel", devel), ("test", test))]
        each = " ; ".join(f"{r['devel']:.3f} / {r['test']:.3f}" for r in runs)
        lines.append(f"| {name} | {devel:.3f} | {test:.3f} | {' | '.join(gaps)} | {each} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
