"""`dsl_fed train --central` and `dsl_fed evaluate`: the paper's centralised protocol and model scoring.

- ``train --central CONFIG [section.key=value ...] [--fuse-dev]``: two-phase training on train with
  selection on devel, report devel and test (see `dsl_fed.central.run_central`), run folder
  ``<output.directory>/<output.name>/``.
- ``evaluate MODEL --config CONFIG --partition test``: clip-level UAR with 95 % bootstrap CIs (speaker-level, the
  primary one, and clip-level) and per-speaker UAR of a saved ``.keras`` model on one partition of the config's
  manifest. With ``--personalize K``: each speaker's head fine-tuned on K of their clips, before/after per speaker
  (`dsl_fed.cli.personalize.run_personal_evaluate`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dsl_fed.cli.arguments import int_in
from dsl_fed.errors import DslFedError
from dsl_fed.io import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="centralised two-phase training (train -> select on devel -> test)",
        description="Train centrally as in the paper: phase 1 head, phase 2 top backbone layers, model selection on "
        "devel, UAR with 95 % CI on devel and test. Federated training is `dsl_fed simulate`.",
    )
    p.add_argument("--central", type=Path, required=True, metavar="CONFIG", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. training.phase1_epochs=5")
    p.add_argument("--fuse-dev", action="store_true", help="then retrain on train+devel with the selected epochs and report test")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of this name (only once the new run has finished)")
    p.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                   help="Keras progress: 0 silent, 1 bars, 2 epoch lines (default: bars on a terminal, else epoch lines)")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate",
        help="clip-level UAR (95 %% CI) of a saved model on one partition",
        description="Score a saved .keras model on one partition of the config's manifest: UAR with 95 % bootstrap "
        "CIs (speakers: resampling speakers, then their clips; clips: resampling clips), accuracy, per-speaker UAR.",
    )
    p.add_argument("model", type=Path,
                   help="trained model (.keras); with --personalize also the folder of a trainable export")
    p.add_argument("--config", type=Path, required=True, help="YAML config of the data (manifest, chunking)")
    p.add_argument("--partition", choices=["train", "devel", "test"], default="test", help="partition to score (default: test)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--personalize", type=int_in(1, 100_000), default=None, metavar="K",
                   help="per speaker of the partition: fine-tune the head on K of their clips with LiteRT, score the "
                   "rest before and after; writes <model>_personalize_<partition>_k<K>.md beside the model")
    p.add_argument("--epochs", type=int_in(1, 10_000), default=None,
                   help="with --personalize: fine-tuning epochs (default: dsl_fed personalize's)")
    p.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from dsl_fed.central import run_central
    from dsl_fed.config import load_config

    cfg = load_config(args.central, args.overrides)
    metrics = run_central(cfg, fuse_dev=args.fuse_dev, verbose=verbosity(args.verbose), command=command_line(),
                          overwrite=args.overwrite)
    print_summaries(metrics)
    print(f"run folder: {cfg.output.run_dir} (report.md, metrics.json, model.keras, plots/)")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from dsl_fed.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.personalize is not None:
        from dsl_fed.cli.personalize import run_personal_evaluate

        return run_personal_evaluate(args, cfg)
    if args.epochs is not None:
        raise DslFedError("--epochs needs --personalize K")
    if args.json is not None:  # before TensorFlow loads: a refused path costs no time
        check_output_file(args.json, (args.model, args.config, cfg.data.manifest), _is_metrics_json, "--json file")

    from dsl_fed.data.manifest import load_manifest, own_speaker_warning
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.metrics import evaluate_chunks
    from dsl_fed.models import load_model
    from dsl_fed.report import spread_line, write_metrics_json

    model = load_model(args.model)
    manifest = load_manifest(cfg.data)
    if int(model.output_shape[-1]) != len(manifest.classes):
        raise DslFedError(
            f"{args.model}: the model has {model.output_shape[-1]} outputs but the manifest has "
            f"{len(manifest.classes)} classes ({', '.join(manifest.classes)})"
        )
    if int(model.input_shape[-1]) != cfg.data.chunk_samples:
        raise DslFedError(
            f"{args.model}: the model takes {model.input_shape[-1]} samples per chunk but the config gives "
            f"data.chunk_seconds x data.sample_rate = {cfg.data.chunk_samples}"
        )
    clips = manifest.partition(args.partition, required=True)
    unscored = [c for c in manifest.classes if c not in {clip.label for clip in clips}]
    if unscored:
        print(f"warning: {args.partition} has no clips of the trained class(es) {', '.join(unscored)}; its UAR averages "
              f"the other {len(manifest.classes) - len(unscored)} classes", file=sys.stderr)
    if manifest.unattributed:  # the per-speaker numbers below are per clip for these clips
        print(f"warning: {own_speaker_warning(manifest.unattributed, len(manifest.clips))}", file=sys.stderr)
    chunks = load_chunks(clips, cfg.data, manifest.classes)
    metrics = evaluate_chunks(model, chunks, manifest.classes, cfg.training.batch_size, seed=cfg.training.seed)
    print(summary(args.partition, metrics))
    print("per-speaker UAR: " + ", ".join(f"{s} {u:.3f}" for s, u in metrics["per_speaker"].items()))
    print(spread_line(metrics["speaker_spread"]))
    if args.json is not None:
        write_metrics_json(args.json, metrics)
    return 0


def _is_metrics_json(path: Path) -> bool:
    """An earlier ``evaluate --json`` output (the only kind of existing file it may replace)."""
    import json

    data = json.loads(path.read_text())
    return isinstance(data, dict) and {"uar", "ci", "accuracy"} <= data.keys()


def verbosity(requested: int | None) -> int:
    """Keras progress: as requested, else bars on a terminal and one line per epoch in a log file."""
    return requested if requested is not None else (1 if sys.stdout.isatty() else 2)


def command_line() -> str:
    """This process's command line as a user would type it (recorded in ``report.md``)."""
    return "dsl_fed " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""


def print_summaries(metrics: dict) -> None:
    """One line per reported partition of a run's ``metrics.json``."""
    for part in ("devel", "test_train_only", "test"):
        if part in metrics:
            print(summary(part, metrics[part]))


def summary(part: str, m: dict) -> str:
    """``devel: UAR 0.812, 95 % CI (speakers) [0.610, 0.950], (clips) [0.700, 0.910], accuracy 0.800, 36 clips``,
    then the interval's note, if any (e.g. every clip its own speaker)."""
    from dsl_fed.bootstrap import ci_text

    note = f" ({m['ci_note']})" if "ci_note" in m else ""
    return f"{part}: UAR {m['uar']:.3f}, {ci_text(m)}, accuracy {m['accuracy']:.3f}, {m['num_clips']} clips{note}"
