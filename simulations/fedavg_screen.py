"""A quick in-process FedAvg screen, without Flower: for trying federated schedules before paying for real runs.

    python -m simulations.fedavg_screen configs/quickstart.yaml [section.key=value ...] [--server-momentum 0.9]

Mirrors what the Flower apps do each round - every shard's client starts from the global weights, trains its
phase's slice with `dsl_fed.train.train_local` for ``federated.local_epochs`` with the seed
``training.seed + 1000 * round + shard``, and the server averages the slice weighted by examples - but runs the
clients one after the other in this process (no SuperLink, no Ray, no messages), optionally with server
momentum (FedAvgM: ``v = momentum * v + (avg - w)``, ``w += v``). Prints the devel UAR per round and the best
round. Numbers are close to, not identical with, `dsl_fed simulate` (different processes, thread counts and
float rounding); confirm a schedule with `dsl_fed experiment` before relying on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def screen(config: Path, overrides: list[str], server_momentum: float = 0.0) -> dict:
    """Devel/test UAR of the global model after every round; ``best`` = (round, devel, test) at the best devel."""
    import keras
    import numpy as np

    from dsl_fed.config import load_config
    from dsl_fed.data import load_chunks, load_manifest, shard_clips
    from dsl_fed.metrics import evaluate_chunks
    from dsl_fed.models import build_model, get_weights_by_name, set_phase, set_weights_by_name
    from dsl_fed.models import trainable_weight_names, weight_names
    from dsl_fed.train import train_local

    cfg = load_config(config, overrides)
    manifest = load_manifest(cfg.data)
    shards = [load_chunks(s, cfg.data, manifest.classes, progress=False)
              for s in shard_clips(manifest.partition("train", required=True), cfg.data.shards, cfg.data.seed)]
    held_out = {part: load_chunks(manifest.partition(part, required=True), cfg.data, manifest.classes, progress=False)
                for part in ("devel", "test")}
    model = build_model(cfg, len(manifest.classes))
    weights = get_weights_by_name(model, weight_names(model))
    velocity: dict[str, np.ndarray] = {}
    fed = cfg.federated
    curve = []
    for rnd in range(1, fed.phase1_rounds + fed.phase2_rounds + 1):
        phase = 1 if rnd <= fed.phase1_rounds else 2
        updates, examples = [], []
        for k, chunks in enumerate(shards):
            keras.backend.clear_session()
            local = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=cfg.training.seed + 1000 * rnd + k))
            client = build_model(local, len(manifest.classes))
            set_weights_by_name(client, weights)
            set_phase(client, phase, cfg.training.unfrozen_layers)
            names = trainable_weight_names(client)
            result = train_local(client, chunks, None, local, phase, epochs=fed.local_epochs, verbose=0,
                                 seed=local.training.seed)
            updates.append(get_weights_by_name(client, names))
            examples.append(result.num_examples)
        share = np.asarray(examples, dtype=np.float64) / sum(examples)
        for name in names:
            delta = sum(s * u[name] for s, u in zip(share, updates)) - weights[name]
            velocity[name] = server_momentum * velocity.get(name, 0.0) + delta
            weights[name] = (weights[name] + velocity[name]).astype(np.float32)
        keras.backend.clear_session()
        scorer = build_model(cfg, len(manifest.classes))
        set_weights_by_name(scorer, weights)
        scores = {part: evaluate_chunks(scorer, chunks, manifest.classes, n_boot=10)["uar"] for part, chunks in held_out.items()}
        curve.append((rnd, round(scores["devel"], 3), round(scores["test"], 3)))
        print(f"round {rnd} phase {phase}: devel {scores['devel']:.3f} test {scores['test']:.3f}", file=sys.stderr, flush=True)
    best = max(curve, key=lambda c: (c[1], -c[0]))
    return {"overrides": overrides, "server_momentum": server_momentum, "best": best, "devel": [c[1] for c in curve]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM momentum (0 = FedAvg)")
    args = parser.parse_args(argv)
    print(json.dumps(screen(args.config, args.overrides, args.server_momentum)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
