"""Privacy measured by attacks: speaker-level membership inference on the published model, attribute inference
on client updates, without DP and at several ε, next to the bound DP implies.

    python -m simulations.privacy_audit [--speakers 248] [--members 24] [--clips 3] [--train-clips 1]
        [--rounds 10] [--local-epochs 10] [--epsilons 1,8,100] [--clip-norm 2] [--jobs 1]
        [--work runs/privacy_audit] [--out benchmarks/results/privacy_audit.md] [section.key=value ...]

**Membership.** An arousal corpus (`simulations.audit_corpus`) gives two federations of `--members` one-speaker
clients each - the target, whose final global model is published, and the attacker's shadow, trained the same
way on other speakers - and speakers neither saw. The attack (`simulations.membership`) scores each speaker by
the published model's mean log-likelihood of the true labels on the speaker's clips and calls it a member above
a threshold. Reported on the target: AUC and TPR at FPR 1 % and 10 % over all thresholds (the ROC, as is usual
for such attacks), with percentile bootstrap CIs over speakers; the TPR and FPR that thresholds calibrated on
the shadow federation's speakers actually reach; the bound (ε, δ)-DP implies at each FPR, and the tighter
Gaussian-DP one of the composed releases. Two variants: scored on fresh clips of the same speakers (speaker
membership, not clip membership), and calibrated per speaker by a model that never saw it (the target's score
minus the other federation's model's score: an offline LiRA with one reference model - a full LiRA needs many
shadow federations per speaker, more than this machine affords). Every setting trains its own target and
shadow: without DP, then with the noise multiplier whose ε after `--rounds` releases is each of `--epsilons`.

**Attribute inference.** A phase-1-only federation of (nearly) every speaker of the corpus; the round-1 update
each client sends (its head-slice delta) is the input of a cross-validated logistic regression predicting the
speaker's pitch group (tertile of the generator's pitch offset) and eSpeak voice sex (`simulations.attribute_probe`):
raw (what the server sees without DP or in ``dp.mode: server``), clipped (``dp.mode: client``), and clipped plus
the noise the DP mean adds, as an adversary who knows every other update sees it. For reference the same probe
reads each speaker's mean backbone features (what the head trains on; never sent).

The setting is chosen to memorise (one clip per class and speaker, 10 local epochs, no dropout, learning rate
0.01, all clients every round: `MEMORISE` and the defaults), so that the attack has something to find. Resumable: each finished federation is appended to
``WORK/cells.jsonl`` and skipped when run again with the same settings. The federations run in-process
(`simulations.inprocess`), one fresh process each, `--jobs` at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "arousal.yaml"
MEMORISE = ["model.dropout=0", "training.learning_rate=0.01"]  # before the user's overrides, which win
# every client trains local epochs every round, as in the kept results (the preset samples 8 gradient steps)
FEDAVG = ["federated.local_update=train", "federated.strategy=fedavg", "federated.fraction_train=1.0"]
DEVEL_IN_PROBE = 4  # speakers the probe federation keeps as its devel set (a run needs one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=248, help="speakers of the arousal corpus")
    parser.add_argument("--members", type=int, default=24, help="clients (one speaker each) per federation")
    parser.add_argument("--clips", type=int, default=3, help="clips per class per speaker in the corpus")
    parser.add_argument("--train-clips", type=int, default=1, help="clips per class a member trains on (the rest are fresh)")
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="who is in which federation, bootstrap draws")
    parser.add_argument("--rounds", type=int, default=10, help="1 phase-1 round + the rest in phase 2")
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--epsilons", default="1,8,100", help="target ε of the DP settings (comma-separated)")
    parser.add_argument("--clip-norm", type=float, default=2.0, help="federated.dp.clip_norm of the DP settings")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--jobs", type=int, default=1, help="federations at a time (one process each)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "privacy_audit", help="corpus, manifests, cells")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "privacy_audit.md")
    parser.add_argument("--write-only", action="store_true", help="write the report from the recorded cells, run none")
    parser.add_argument("overrides", nargs="*", help="further section.key=value settings of every federation")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    load = os.getloadavg()[0]
    plan = make_plan(args)
    cells = finished_cells(args.work / "cells.jsonl", plan["base"])
    todo = [c for c in plan["cells"] if c not in cells and not args.write_only]
    print(f"{len(plan['cells']) - len(todo)} of {len(plan['cells'])} federations already in {args.work / 'cells.jsonl'}; "
          f"{len(todo)} to go", flush=True)
    spawn = multiprocessing.get_context("spawn")  # a fresh TensorFlow per federation
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_cell, cell, plan): cell for cell in todo}
        for future in as_completed(futures):
            cell, result = futures[future], future.result()
            cells[cell] = result
            with (args.work / "cells.jsonl").open("a") as f:  # appended when done: an interrupted audit resumes
                f.write(json.dumps({"base": plan["base"], "cell": list(cell), **result}) + "\n")
            eps = "" if result.get("epsilon") is None else f" | ε {result['epsilon']:.3g}"
            uar = "" if result.get("uar") is None else f" | devel UAR {result['uar']:.3f}"
            print(f"{cell[0]:>8} {setting_name(cell[1]):>14}{uar}{eps} | {result['seconds']:.0f} s "
                  f"({result['cpu_seconds']:.0f} s CPU) | {len(cells)}/{len(plan['cells'])}", flush=True)
    missing = [c for c in plan["cells"] if c not in cells]
    if missing:
        print(f"privacy_audit: error: {len(missing)} federations not run yet (first: {missing[0]})", file=sys.stderr)
        return 2
    from dsl_fed.io import atomic_write
    from dsl_fed.report import save_figure
    from simulations.audit_report import render

    report, figure = render(args, plan, cells, load)
    atomic_write(args.out, report)
    save_figure(figure, args.out.with_suffix(".png"))
    print(report)
    return 0


# ------------------------------------------------------------------------------------------------ plan


def make_plan(args: argparse.Namespace) -> dict:
    """The corpus (made once), the speakers' roles, the federations' manifests and every cell to run."""
    from dsl_fed.data.arousal import make_arousal_corpus
    from simulations.audit_corpus import assign_roles, read_corpus, write_federation_manifest

    if not 1 <= args.train_clips < args.clips:
        raise SystemExit(f"privacy_audit: error: --train-clips must be in [1, --clips) to leave fresh clips, "
                         f"got {args.train_clips} of {args.clips}")
    work = args.work.resolve()
    corpus = work / f"arousal_{args.speakers}x{args.clips}_seed{args.corpus_seed}"
    if not (corpus / "manifest.csv").is_file():
        print(f"synthesising the corpus into {corpus} ...", flush=True)
        make_arousal_corpus(corpus, speakers=args.speakers, clips=args.clips, seed=args.corpus_seed, progress=False)
    clips = read_corpus(corpus / "manifest.csv")
    speakers = sorted({c.speaker for c in clips})
    roles = assign_roles(speakers, args.members, args.seed)
    manifests = {
        "target": write_federation_manifest(work / "target.csv", corpus, clips, roles["target-in"],
                                            roles["target-out"], args.train_clips),
        "shadow": write_federation_manifest(work / "shadow.csv", corpus, clips, roles["shadow-in"],
                                            roles["shadow-out"], args.train_clips),
    }
    held = roles["target-out"][:DEVEL_IN_PROBE]
    manifests["probe"] = write_federation_manifest(work / "probe.csv", corpus, clips,
                                                   [s for s in speakers if s not in held], held, args.train_clips)
    noises = [noise_for_epsilon(float(e), args.rounds, args.delta) for e in args.epsilons.split(",") if e.strip()]
    base = [f"data.shards=0", "federated.phase1_rounds=1", f"federated.phase2_rounds={args.rounds - 1}",
            f"federated.local_epochs={args.local_epochs}", "federated.fraction_evaluate=0",
            "output.name=privacy_audit", *FEDAVG, *MEMORISE, *args.overrides]
    settings = [None, *noises]
    cells = [(fed, noise) for noise in settings for fed in ("target", "shadow")] + [("probe", None), ("features", None)]
    return {"base": base, "corpus": str(corpus), "manifests": {k: str(v) for k, v in manifests.items()},
            "roles": roles, "settings": settings, "cells": cells, "clip_norm": args.clip_norm, "delta": args.delta,
            "clips": clips, "train_clips": args.train_clips, "rounds": args.rounds, "seed": args.seed,
            "corpus_seed": args.corpus_seed, "probe_devel": len(held), "tuning": [*MEMORISE, *args.overrides]}


def noise_for_epsilon(target: float, releases: int, delta: float) -> float:
    """The noise multiplier (3 significant digits, rounded up) whose ε after `releases` rounds is at most `target`."""
    from dsl_fed.privacy import epsilon

    low, high = 1e-3, 1e3  # epsilon falls as the multiplier grows
    for _ in range(100):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon(mid, releases, delta) > target else (low, mid)
    digits = 2 - math.floor(math.log10(high))
    return math.ceil(high * 10 ** digits) / 10 ** digits


def setting_name(noise: float | None) -> str:
    return "no DP" if noise is None else f"z {noise:g}"


def dp_overrides(noise: float | None, clip_norm: float, delta: float) -> list[str]:
    if noise is None:
        return []
    return ["federated.dp.mode=server", "federated.dp.clipping=fixed", f"federated.dp.clip_norm={clip_norm}",
            f"federated.dp.noise_multiplier={noise}", f"federated.dp.delta={delta}"]


def finished_cells(path: Path, base: list[str]) -> dict[tuple, dict]:
    """The federations `path` holds for exactly these settings."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return {tuple(r["cell"]): {k: v for k, v in r.items() if k not in ("base", "cell")} for r in rows if r["base"] == base}


# ------------------------------------------------------------------------------------------- one federation


def run_cell(cell: tuple, plan: dict) -> dict:
    """Train one federation in this (fresh) process; what the audit needs from it, as JSON-able values.

    target / shadow: the final model's log-likelihood of the true label for every corpus clip (clip order of
    the corpus manifest). probe: each client's round-1 slice update. Both: the norms of the updates the
    clients sent, per round (what the clipping norm compares with).
    """
    from simulations import inprocess

    federation, noise = cell
    load = os.getloadavg()[0]
    if federation == "features":
        start = time.perf_counter()
        features = speaker_features([*plan["base"], f"data.manifest={plan['manifests']['probe']}"])
        return {"features": features, "seconds": time.perf_counter() - start, "load": load,
                "cpu_seconds": time.process_time()}
    overrides = [*plan["base"], f"data.manifest={plan['manifests'][federation]}",
                 *dp_overrides(noise, plan["clip_norm"], plan["delta"])]
    if federation == "probe":
        overrides += ["federated.phase2_rounds=0"]
    recorder = UpdateRecorder(keep_round=1 if federation == "probe" else None)
    outcome = inprocess.run(CONFIG, overrides, recorder)
    result = {"uar": outcome.devel_uar, "epsilon": outcome.epsilon, "rounds": outcome.rounds,
              "seconds": outcome.seconds, "update_norms": recorder.norms, "load": load}
    if federation == "probe":
        result["updates"] = {str(p): u.tolist() for p, u in sorted(recorder.kept.items())}
        result["clients"] = client_speakers(overrides)
    else:
        result["loglik"] = score_corpus(overrides, outcome.weights, Path(plan["corpus"]) / "manifest.csv")
    result["cpu_seconds"] = time.process_time()  # this fresh process's CPU time, imports included
    return result


class UpdateRecorder:
    """A tamper hook that changes nothing: it records each honest reply's update norm (and, for `keep_round`,
    the update itself) per partition."""

    def __init__(self, keep_round: int | None = None):
        self.keep_round = keep_round
        self.norms: dict[str, list[float]] = {}  # round -> norms of the replies, in arrival order
        self.kept: dict[int, np.ndarray] = {}

    def __call__(self, partition: int, msg, honest):
        reply = honest(msg)
        if reply.has_error() or not reply.content.array_records:  # evaluation replies carry no weights
            return reply
        server_round = int(msg.content["config"]["server-round"])
        sent = next(iter(msg.content.array_records.values()))
        back = next(iter(reply.content.array_records.values()))
        update = np.concatenate([(back[n].numpy().astype(np.float64) - sent[n].numpy().astype(np.float64)).ravel()
                                 for n in sorted(back.keys())])
        self.norms.setdefault(str(server_round), []).append(float(np.linalg.norm(update)))
        if server_round == self.keep_round:
            self.kept[partition] = update
        return reply


def client_speakers(overrides: list[str]) -> list[str]:
    """Partition id -> speaker of a one-speaker-per-client federation (partitions are sorted speakers)."""
    from dsl_fed.config import load_config
    from dsl_fed.data import load_manifest, partition_speakers

    cfg = load_config(CONFIG, overrides)
    return [group[0] for group in partition_speakers(load_manifest(cfg.data).speakers("train"), 0)]


def speaker_features(overrides: list[str]) -> dict[str, list[float]]:
    """Each training speaker's mean backbone features over its chunks: what the phase-1 head is trained on.

    The probe's reference: an attribute these features do not show cannot be read from a head update either.
    """
    import keras

    from dsl_fed.config import load_config
    from dsl_fed.data import load_chunks, load_manifest
    from dsl_fed.models import build_embedder
    from dsl_fed.predict import predict_batches

    cfg = load_config(CONFIG, overrides)
    manifest = load_manifest(cfg.data)
    keras.backend.clear_session()
    embedder = build_embedder(cfg)  # the same seeded random backbone as the federations' models
    chunks = load_chunks(manifest.partition("train", required=True), cfg.data, manifest.classes, progress=False)
    embeddings = predict_batches(embedder, chunks.waveforms, cfg.training.batch_size).astype(np.float64)
    return {s: embeddings[chunks.speakers == s].mean(axis=0).tolist() for s in np.unique(chunks.speakers)}


def score_corpus(overrides: list[str], weights: dict[str, np.ndarray], corpus_manifest: Path) -> list[float]:
    """log p(true label) of every corpus clip under `weights` (chunk probabilities averaged per clip)."""
    import keras

    from dsl_fed.config import load_config
    from dsl_fed.data import load_chunks, read_manifest
    from dsl_fed.models import build_model, set_weights_by_name
    from dsl_fed.predict import predict_clips

    cfg = load_config(CONFIG, overrides)
    manifest = read_manifest(corpus_manifest)
    keras.backend.clear_session()
    model = build_model(cfg, len(manifest.classes))
    set_weights_by_name(model, weights)
    chunks = load_chunks(manifest.clips, cfg.data, manifest.classes, progress=False)
    ids, probs, labels, _ = predict_clips(model, chunks, batch_size=cfg.training.batch_size)
    assert np.array_equal(ids, np.arange(len(manifest.clips)))
    return np.log(np.maximum(probs[np.arange(len(labels)), labels].astype(np.float64), 1e-30)).tolist()


if __name__ == "__main__":
    sys.exit(main())
