"""`dsl_fed personalize MODEL_DIR CLIPS`: fine-tune the head on one user's clips with LiteRT, keep an inference model.

- ``MODEL_DIR``: the folder `dsl_fed export MODEL.keras --trainable` wrote (its ``.tflite`` + ``manifest.json``),
  or the ``.tflite`` in it. Its manifest gives the classes, chunking and batch size, so no config is needed.
- ``CLIPS``: the user's labelled clips as any corpus here is given: a manifest CSV ``filename,label[,speaker]``
  or a folder-per-class directory (``CLIPS/<label>/*.wav``); or, with ``--labels CSV``, a folder of audio files
  and a CSV ``filename,label`` naming them (file names relative to that folder). Every label must be one of the
  model's classes; a partition column is ignored (all clips are the user's training clips).
- Writes ``--out DIR`` (default ``<MODEL_DIR>/../tflite_personalized/``): ``model.tflite`` (raw audio in, as
  `dsl_fed export` writes; built without TensorFlow, see `dsl_fed.head_inference`), its ``manifest.json`` and
  ``head.npz`` (the personalised head by weight key, which ``--weights`` takes back to continue from).

Runs with LiteRT and numpy only (`dsl_fed.personalize`). Everything is read and checked before anything is
written; a folder already holding files this command did not write is refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from dsl_fed.cli.arguments import int_in, seed, threads
from dsl_fed.errors import DslFedError

OUT_FOLDER, MODEL_FILE, HEAD_FILE = "tflite_personalized", "model.tflite", "head.npz"
CHECK_CHUNKS = 16  # chunks the written model is compared on


def register(subparsers: argparse._SubParsersAction) -> None:
    from dsl_fed.personalize import DEFAULT_EPOCHS

    p = subparsers.add_parser(
        "personalize",
        help="fine-tune a trainable export's head on one user's labelled clips (LiteRT only) -> inference .tflite",
        description="Embed the user's clips with the trainable model, train its head for --epochs epochs of the "
        "model's batch size (balanced class weights as in training), and write a personalised inference .tflite "
        "(raw audio in) with manifest.json and head.npz. Needs LiteRT and numpy only, no TensorFlow.",
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                   help="folder of `dsl_fed export MODEL.keras --trainable` (or its .tflite)")
    p.add_argument("clips", type=Path, metavar="CLIPS",
                   help="manifest CSV (filename,label[,speaker]) or folder-per-class directory; with --labels a folder "
                   "of audio files")
    p.add_argument("--labels", type=Path, default=None, metavar="CSV",
                   help="CSV with columns filename,label for the audio files in the CLIPS folder")
    p.add_argument("--epochs", type=int_in(1, 10_000), default=DEFAULT_EPOCHS,
                   help=f"training epochs over the clips (default: {DEFAULT_EPOCHS})")
    p.add_argument("--weights", type=Path, default=None, metavar="NPZ",
                   help="start from these head weights (a head.npz this command wrote) instead of the model's")
    p.add_argument("--seed", type=seed, default=0, help="seed of the batch order and dropout masks (default: 0)")
    p.add_argument("--threads", type=threads, default=2, help="LiteRT CPU threads (default: 2)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help=f"output folder (default: {OUT_FOLDER}/ beside MODEL_DIR)")
    p.set_defaults(func=run_personalize)


def run_personalize(args: argparse.Namespace) -> int:
    from dsl_fed.config import DataConfig
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.export import check_export_target
    from dsl_fed.federated.litert_runtime import DROPOUT_STREAM
    from dsl_fed.io import atomic_write, check_output_file
    from dsl_fed.litert_training import TrainableRunner
    from dsl_fed.metrics import uar
    from dsl_fed.personalize import (clip_predictions, embed_chunks, fine_tune, load_trainable, read_head_weights,
                                     write_inference)

    model = load_trainable(args.model_dir)
    m = model.manifest
    folder = (args.out if args.out is not None else model.path.parent.parent / OUT_FOLDER)
    out = folder / MODEL_FILE
    reading = [p for p in (model.path, model.manifest_path, args.clips, args.labels, args.weights) if p is not None]
    check_export_target(out, reading)
    check_output_file(folder / HEAD_FILE, reading, _is_head_npz, "personalised head")
    clips = read_clips(args.clips, args.labels, model.classes)
    runner = TrainableRunner(model.path, threads=args.threads, seed=(args.seed, DROPOUT_STREAM))
    if runner.num_classes != len(model.classes):
        raise DslFedError(f"{model.manifest_path}: lists {len(model.classes)} classes but {model.path} has "
                          f"{runner.num_classes} outputs; export the model again")
    if args.weights is not None:
        runner.restore(read_head_weights(args.weights, runner))
    data = DataConfig(manifest=str(args.clips), sample_rate=int(m["sample_rate"]),
                      chunk_seconds=float(m["window_seconds"]), hop_seconds=float(m["hop_seconds"]))
    chunks = load_chunks(clips, data, model.classes, progress=False)

    batch = int(m["batch_size"])
    x = embed_chunks(runner, chunks.waveforms, batch)
    labels, before = clip_predictions(runner, x, chunks, batch)
    loss = fine_tune(runner, x, chunks.labels, batch_size=batch, epochs=args.epochs, seed=args.seed,
                     class_balance=str(m["class_balance"]))
    _, after = clip_predictions(runner, x, chunks, batch)
    weights = runner.parameters()
    scores = {"uar_before": uar(labels, before.argmax(axis=1)), "uar_after": uar(labels, after.argmax(axis=1)),
              "accuracy_before": float(np.mean(before.argmax(axis=1) == labels)),
              "accuracy_after": float(np.mean(after.argmax(axis=1) == labels))}
    check = np.linspace(0, len(chunks) - 1, min(CHECK_CHUNKS, len(chunks))).round().astype(int)
    extra = {"personalized": {
        "from_trainable_sha256": m["sha256"], "clips": len(clips), "chunks": len(chunks), "epochs": args.epochs,
        "batch_size": batch, "seed": args.seed, "class_balance": m["class_balance"], "final_loss": loss,
        "start_weights": str(args.weights) if args.weights is not None else "the trainable model's head",
        "training_clips": {k: round(v, 6) for k, v in scores.items()}}}
    write_inference(model, weights, out, chunks.waveforms[check], runner.infer(x[check]), extra)
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    atomic_write(folder / HEAD_FILE, buffer.getvalue())
    print(f"personalised on {len(clips)} clip(s) ({len(chunks)} chunks) for {args.epochs} epoch(s) of batch {batch}: "
          f"training clips UAR {scores['uar_before']:.3f} -> {scores['uar_after']:.3f}, accuracy "
          f"{scores['accuracy_before']:.3f} -> {scores['accuracy_after']:.3f}, last epoch loss {loss:.4f}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, raw audio in) + {folder / 'manifest.json'} + "
          f"{folder / HEAD_FILE}")
    return 0


def read_clips(clips: Path, labels: Path | None, classes: list[str]) -> list:
    """The user's clips with labels among `classes` (see the module docstring for the two forms)."""
    from dsl_fed.data.manifest import read_manifest

    if labels is None:
        return read_manifest(clips, classes=classes).clips
    if not clips.is_dir():
        raise DslFedError(f"{clips}: with --labels, CLIPS must be the folder of the audio files the CSV names")
    return _labelled_folder(clips, labels, classes)


def _labelled_folder(folder: Path, labels: Path, classes: list[str]) -> list:
    """Clips of `folder` named in the ``filename,label`` CSV `labels`; each problem names the CSV line."""
    from dsl_fed.data.audio import SUPPORTED_EXTENSIONS
    from dsl_fed.data.manifest import Clip

    try:
        with open(labels, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeError, csv.Error) as exc:
        raise DslFedError(f"{labels}: cannot read the labels CSV ({exc.__class__.__name__}: {exc})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "filename" not in header or "label" not in header:
        raise DslFedError(f"{labels}: the header must name the columns filename and label (got {','.join(header) or 'nothing'})")
    name_at, label_at = header.index("filename"), header.index("label")
    clips, seen = [], {}
    for line, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        where = f"{labels} line {line}"
        if len(cells) != len(header):
            raise DslFedError(f"{where}: expected {len(header)} comma-separated values, got {len(cells)}")
        name, label = cells[name_at].strip(), cells[label_at].strip()
        path = folder / name
        if label not in classes:
            raise DslFedError(f"{where}: label {label!r} is not one of the model's classes ({', '.join(classes)})")
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DslFedError(f"{where}: {name!r} is not an audio file type read here ({', '.join(SUPPORTED_EXTENSIONS)})")
        if not path.is_file():
            raise DslFedError(f"{where}: audio file {name!r} not found in {folder}")
        if name in seen:
            raise DslFedError(f"{where}: {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        clips.append(Clip(len(clips), path, label, "user", "train"))
    if not clips:
        raise DslFedError(f"{labels}: lists no clips")
    unlabelled = [p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS and p.name not in seen]
    if unlabelled:
        print(f"warning: {len(unlabelled)} audio file(s) in {folder} have no row in {labels} and are left out "
              f"(e.g. {unlabelled[0].name})", file=sys.stderr)
    return clips


def _is_head_npz(path: Path) -> bool:
    """An earlier ``head.npz`` of this command: exactly the six head weight keys."""
    from dsl_fed.head_inference import ROLES

    with np.load(path, allow_pickle=False) as stored:
        return sorted(stored.files) == sorted(ROLES.values())


# ------------------------------------------------------------------------------------ evaluate --personalize


def run_personal_evaluate(args: argparse.Namespace, cfg) -> int:
    """``dsl_fed evaluate MODEL --config C --partition devel|test --personalize K [--epochs N]``.

    MODEL is a ``.keras`` model (its trainable export is made in a temporary folder, with TensorFlow as
    `evaluate` uses anyway) or a trainable export (LiteRT only). The table goes to
    ``<model stem>_personalize_<partition>_k<K>.md`` beside the model file and to stdout.
    """
    import tempfile

    from dsl_fed.data.manifest import load_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.io import atomic_write, check_output_file
    from dsl_fed.personal_eval import personalize_speakers, render, summarize
    from dsl_fed.personalize import DEFAULT_EPOCHS

    if args.partition == "train":
        raise DslFedError("--personalize scores held-out speakers: use --partition devel or test")
    if args.json is not None:
        raise DslFedError("--json and --personalize: the personalisation table is written beside the model")
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS
    manifest = load_manifest(cfg.data)
    clips = manifest.partition(args.partition, required=True)
    model_file = _model_file(args.model)
    results = model_file.parent / f"{model_file.stem}_personalize_{args.partition}_k{args.personalize}.md"
    check_output_file(results, [args.model, args.config, cfg.data.manifest], _is_personal_table,
                      "personalisation table")
    with tempfile.TemporaryDirectory(prefix="dsl_fed_personal_eval_") as tmp:
        trainable = _trainable_for(args.model, cfg, list(manifest.classes), Path(tmp))
        chunks = load_chunks(clips, cfg.data, manifest.classes)
        speakers, skipped = personalize_speakers(
            trainable, clips, chunks, k=args.personalize, epochs=epochs, batch_size=cfg.training.batch_size,
            seed=cfg.training.seed, class_balance=cfg.training.class_balance)
    summary = summarize(speakers, manifest.classes, seed=cfg.training.seed)
    table = render(summary, {"model": str(args.model), "partition": args.partition, "k": args.personalize,
                             "corpus": str(cfg.data.manifest), "skipped": skipped, "seed": cfg.training.seed,
                             "epochs": epochs, "batch_size": cfg.training.batch_size})
    atomic_write(results, table)
    print(table)
    print(f"written to {results}", file=sys.stderr)
    return 0


def _model_file(model: Path) -> Path:
    """The file the results sit beside: a ``.keras`` file, or the ``.tflite`` of a trainable export folder."""
    if model.is_dir():
        from dsl_fed.personalize import load_trainable

        return load_trainable(model).path
    if not model.is_file():
        raise DslFedError(f"{model}: model file not found")
    return model


def _trainable_for(model: Path, cfg, classes: list[str], tmp: Path) -> Path:
    """A trainable ``.tflite`` of `model` whose classes and chunk length are the config's."""
    from dsl_fed.personalize import load_trainable

    if model.is_dir() or model.suffix == ".tflite":
        trainable = load_trainable(model)
        if trainable.classes != classes:
            raise DslFedError(f"{trainable.manifest_path}: classes {', '.join(trainable.classes)} are not the "
                              f"manifest's ({', '.join(classes)})")
        if list(trainable.manifest["input_shape"]) != [cfg.data.chunk_samples]:
            raise DslFedError(f"{trainable.manifest_path}: takes {trainable.manifest['input_shape'][0]} samples per "
                              f"chunk, the config gives {cfg.data.chunk_samples}")
        return trainable.path
    from dsl_fed.models import load_model
    from dsl_fed.trainable_export import export_trainable

    keras_model = load_model(model)
    if int(keras_model.output_shape[-1]) != len(classes) or int(keras_model.input_shape[-1]) != cfg.data.chunk_samples:
        raise DslFedError(f"{model}: takes {keras_model.input_shape[-1]} samples and has {keras_model.output_shape[-1]} "
                          f"outputs; the config gives {cfg.data.chunk_samples} samples and {len(classes)} classes")
    return export_trainable(keras_model, tmp / "model.tflite", classes=classes, cfg=cfg)


def _is_personal_table(path: Path) -> bool:
    """An earlier table of ``evaluate --personalize``."""
    from dsl_fed.personal_eval import TITLE

    return path.read_text().startswith(TITLE)
