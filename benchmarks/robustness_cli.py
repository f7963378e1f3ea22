"""Robustness probe: bad inputs and faults against the real `dsl_fed` command, counted.

    python benchmarks/robustness_cli.py               # all cases, ~25 min on 2 cores (7 Flower runs)
    python benchmarks/robustness_cli.py --fast        # only the cases that need no TensorFlow (~1 min)
    python benchmarks/robustness_cli.py --no-flower   # all but the 7 cases that start a Flower simulation

Every case runs ``python -m dsl_fed ...`` in a subprocess on a small demo corpus, in a fresh folder, with a
unique ``DSL_FED_PROBE`` value in its environment (every process it starts inherits it). A case expects either
a clean error (exit 2, exactly one stderr line starting ``dsl_fed <command>: error:`` and naming the problem,
no traceback) or success, possibly with a warning. Counted:

- clean: the expected outcome;
- tracebacks: a Python traceback on stderr;
- silent acceptances: exit 0 where an error was expected, or a missing warning;
- messy errors: any other failure (several lines, wrong exit code, a message that does not name the problem,
  library start-up chatter such as TensorFlow's native log);
- runs lost: an earlier run of the same name, or a user's folder, changed (it is hashed before and after);
- processes left: processes with the case's ``DSL_FED_PROBE`` still alive 60 s after the command ended.

Writes ``benchmarks/results/robustness_cli.md``. Target: zero in every column but "clean".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf
import yaml

from dsl_fed.federated.watchdog import processes_with

RESULTS = Path(__file__).resolve().parent / "results" / "robustness_cli.md"
PROBE_ENV = "DSL_FED_PROBE"

TINY = {
    "data": {"chunk_seconds": 1.0, "hop_seconds": 0.5, "shards": 2},
    "spectrogram": {"n_mels": 32, "image_size": 32},
    "model": {"backbone": "tiny", "weights": None, "units": 32, "dropout": 0.1},
    "training": {"optimizer": "adam", "learning_rate": 0.003, "batch_size": 32, "phase1_epochs": 1,
                 "phase2_epochs": 1, "unfrozen_layers": 2},
    "federated": {"phase1_rounds": 1, "phase2_rounds": 0, "local_epochs": 1, "min_train_nodes": 2,
                  "min_available_nodes": 2},
    "output": {"name": "run"},
}


# ------------------------------------------------------------------------------------------------ workspace


class Workspace:
    """A case's folder: the demo corpus (shared, read-only), configs, manifests and runs of its own."""

    def __init__(self, root: Path, corpus: Path) -> None:
        self.root = root
        self.corpus = corpus  # folder with manifest.csv and the wavs
        self.runs = root / "runs"
        root.mkdir(parents=True, exist_ok=True)

    def config(self, name: str = "cfg.yaml", manifest: Path | None = None, **sections: dict) -> Path:
        raw = {k: dict(v) for k, v in TINY.items()}
        raw["data"]["manifest"] = str(manifest or self.corpus / "manifest.csv")
        raw["output"]["directory"] = str(self.runs)
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values}
        path = self.root / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def manifest(self, edit: Callable[[list[list[str]]], None], name: str = "m.csv") -> Path:
        """A copy of the demo manifest (absolute file names) changed by `edit` (rows without the header)."""
        lines = (self.corpus / "manifest.csv").read_text().splitlines()
        header, rows = lines[0], [line.split(",") for line in lines[1:]]
        for r in rows:
            r[0] = str(self.corpus / r[0])
        edit(rows)
        path = self.root / name
        path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
        return path

    def wav(self, name: str, data: np.ndarray, rate: int = 16000, subtype: str | None = None) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data, rate, subtype=subtype)
        return path

    def earlier_run(self, name: str = "run") -> Path:
        """A finished-looking earlier run (what must survive a failed or refused re-run byte for byte)."""
        run = self.runs / name
        (run / "round_1").mkdir(parents=True)
        (run / "round_1" / "model.keras").write_bytes(b"earlier model")
        (run / "history.csv").write_text("round,devel_uar\n1,0.5\n")
        (run / "config.yaml").write_text("earlier: config\n")
        (run / "model.keras").write_bytes(b"earlier central model")
        os.symlink("round_1", run / "latest")
        return run


def tree_hash(path: Path) -> str | None:
    """Hash of every file's relative path, bytes and symlink target under `path` (None if absent)."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        digest.update(str(item.relative_to(path)).encode())
        if item.is_symlink():
            digest.update(os.readlink(item).encode())
        elif item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def probe_processes(probe: str) -> list[psutil.Process]:
    """Processes anywhere on the machine whose environment carries this case's probe value."""
    return processes_with(PROBE_ENV, probe)


def wait_gone(probe: str, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := probe_processes(probe)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One probe. `setup` prepares the workspace and returns the CLI arguments (after ``dsl_fed``)."""

    name: str
    setup: Callable[[Workspace], list[str]]
    expect: str  # substring of the one error line, or of stdout+stderr for "warn"
    kind: str = "error"  # "error" | "warn" | "ok" | "pipe" | "signal"
    fast: bool = True  # needs no TensorFlow
    flower: bool = False  # starts a Flower simulation (minutes; serialise with other Flower users)
    protect: str | None = None  # folder under runs/ that must stay byte-identical (an earlier run, a user's files)
    fault: Callable[[subprocess.Popen, Workspace], None] | None = None  # acts on the running command
    shell_tail: str = ""  # e.g. "| head -1": run through a bash pipe
    leaves_nothing: bool = False  # a refused command must not create the run folder (not even logs/)
    in_suite: bool = True  # False: minutes of Flower/Ray, probe only (the test suite checks the mechanism directly)


@dataclass
class Outcome:
    case: Case
    verdict: str  # clean | traceback | silent | messy
    run_lost: bool = False
    processes_left: int = 0
    rounds_after_death: int = 0
    detail: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _override(*items: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["data-stats", str(ws.config()), *items]


def _yaml_text(text: bytes) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        path = ws.root / "bad.yaml"
        path.write_bytes(text.replace(b"MANIFEST", str(ws.corpus / "manifest.csv").encode()))
        return ["data-stats", str(path)]
    return setup


def _with_manifest(edit: Callable[[list[list[str]]], None], *overrides: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["data-stats", str(ws.config(manifest=ws.manifest(edit))), *overrides]


def _same_file_spelt(rows: list[list[str]], spelling: Callable[[str], str]) -> None:
    test = next(r for r in rows if r[3] == "test")
    train = next(r for r in rows if r[3] == "train")
    test[0] = spelling(train[0])


def _audio_case(data: np.ndarray, rate: int = 16000, subtype: str | None = None) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        bad = ws.wav("bad.wav", data, rate, subtype)
        return ["data-stats", str(ws.config(manifest=ws.manifest(lambda rows: rows[1].__setitem__(0, str(bad)))))]
    return setup


def _folder_corpus_with_extra_files(ws: Workspace) -> list[str]:
    import shutil

    folder = ws.root / "folder"
    for line in (ws.corpus / "manifest.csv").read_text().splitlines()[1:]:
        name, label, speaker, part = line.split(",")
        target = folder / part / label / speaker / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ws.corpus / name, target)
    sf.write(folder / "train" / "flat" / "extra.aiff", np.zeros(1600, np.float32), 16000, format="AIFF")
    return ["data-stats", str(ws.config(manifest=folder))]


def _earlier_run_then(args: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        ws.earlier_run()
        return args(ws)
    return setup


def _resume_changed_config(ws: Workspace) -> list[str]:
    run = ws.earlier_run()
    (run / "config.yaml").write_text(yaml.safe_dump({**TINY, "training": {**TINY["training"], "learning_rate": 0.1}}))
    return ["simulate", str(ws.config()), "--resume"]


def _locked_run(ws: Workspace) -> list[str]:
    holder = ws.root / "holder.py"
    holder.write_text(
        "import sys, time\nfrom dsl_fed.io import run_lock\n"
        f"with run_lock({str(ws.runs / 'run')!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    ws.holder = subprocess.Popen([sys.executable, str(holder)], stdout=subprocess.PIPE, text=True)
    ws.holder.stdout.readline()
    return ["simulate", str(ws.config())]


def _trained_model(ws: Workspace) -> Path:
    """A tiny model trained for one epoch by the real CLI (what evaluate/export/predict cases start from); trained
    once per corpus and shared by the cases, which only read it."""
    shared = Workspace(ws.corpus.parent / "shared", ws.corpus)
    model = shared.runs / "trained" / "model.keras"
    if not model.is_file():
        cfg = shared.config("train.yaml", training={"phase2_epochs": 0}, output={"name": "trained"})
        subprocess.run([sys.executable, "-m", "dsl_fed", "train", "--central", str(cfg), "--verbose", "0"],
                       check=True, capture_output=True)
    return model


def _tflite(ws: Workspace) -> Path:
    model = _trained_model(ws)
    tflite = model.parent / "tflite_fp32" / "model.tflite"
    if not tflite.is_file():
        subprocess.run([sys.executable, "-m", "dsl_fed", "export", str(model)], check=True, capture_output=True)
    return tflite


def _nan_model(ws: Workspace) -> Path:
    """The trained model with its output layer's bias set to NaN (what a diverged run used to save)."""
    script = ws.root / "poison.py"
    model = _trained_model(ws)
    script.write_text(
        "import sys, numpy as np, keras\nimport dsl_fed.models\n"
        "m = keras.saving.load_model(sys.argv[1])\nw = m.get_weights(); w[-1] = w[-1] * np.nan; m.set_weights(w)\n"
        "m.save(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, str(script), str(model), str(model.parent / "nan.keras")], check=True,
                   capture_output=True)
    return model.parent / "nan.keras"  # beside config.yaml, which export reads


def _sigterm_when_round_starts(proc: subprocess.Popen, ws: Workspace) -> None:
    _wait_for_line(proc, "flower:")
    time.sleep(8)  # Flower, Ray and the clients are up
    ws.killed_at = time.time()
    proc.send_signal(signal.SIGTERM)


def _sigkill_when_round_starts(proc: subprocess.Popen, ws: Workspace) -> None:
    _wait_for_line(proc, "flower:")
    time.sleep(8)
    ws.killed_at = time.time()
    proc.kill()


def _signal_while_importing(signum: int) -> Callable[[subprocess.Popen, Workspace], None]:
    def fault(proc: subprocess.Popen, ws: Workspace) -> None:
        time.sleep(2.5)  # `train` is importing TensorFlow now
        proc.send_signal(signum)
    return fault


def _sigkill_after(seconds: float) -> Callable[[subprocess.Popen, Workspace], None]:
    def fault(proc: subprocess.Popen, ws: Workspace) -> None:
        time.sleep(seconds)
        proc.kill()
    return fault


def _wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the command's stderr until a line contains `text` (or the stream ends)."""
    for line in proc.stderr:
        if text in line:
            return


def _while_locked(args: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
    """Another live command holds the lock of run name ``run`` while `args` runs (as `_locked_run`)."""
    def setup(ws: Workspace) -> list[str]:
        _locked_run(ws)
        return args(ws)
    return setup


def _deploy_workdir(ws: Workspace) -> None:
    """The live ``runs/run.deploy/`` of a first `deploy local` (keys, node folders, state)."""
    work = ws.runs / "run.deploy"
    (work / "certs").mkdir(parents=True)
    (work / ".dsl_fed-deploy").write_text("made by deploy local\n")
    (work / "certs" / "ca.key").write_text("the live federation's key\n")


def _killed_attempt(ws: Workspace, *changes: str) -> None:
    """What SIGKILL after round 1 of a new run leaves: the finished round in the marked staging folder (its
    config changed by ``section.key=value`` `changes`)."""
    from dsl_fed.config import load_config
    from dsl_fed.io import STAGING_TAG

    run = ws.earlier_run()
    (run / "config.yaml").write_text(load_config(ws.config(), list(changes)).to_yaml())
    staging = ws.runs / ".run.partial-killed01"
    staging.mkdir()
    (staging / STAGING_TAG).write_text("writing\n")
    run.rename(staging / "run")


def _user_files(folder: str, *names: str) -> Callable[[Workspace], None]:
    def make(ws: Workspace) -> None:
        for name in names:
            (ws.runs / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (ws.runs / folder / name).write_text(f"the user's {name}\n")
    return make


def _then(prepare: Callable[[Workspace], None], args: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        prepare(ws)
        return args(ws)
    return setup


def _first_run_stopped_after_round_1(command: list[str], signum: int) -> Callable[[Workspace], list[str]]:
    """Start `command` (3 rounds), send `signum` once round 1 is written, wait for its processes; then resume."""
    def setup(ws: Workspace) -> list[str]:
        args = [*command, str(ws.config(federated={"phase1_rounds": 3}))]
        first = uuid.uuid4().hex
        ws.probes = [first]
        proc = subprocess.Popen([sys.executable, "-m", "dsl_fed", *args], cwd=ws.root, text=True,
                                env={**os.environ, PROBE_ENV: first}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_line(proc, "round 1/3")
        proc.send_signal(signum)
        proc.communicate()
        wait_gone(first, 60)
        return [*args, "--resume"]
    return setup


def _signal_during_federated_cell(signum: int) -> Callable[[subprocess.Popen, Workspace], None]:
    """Signal `dsl_fed experiment` once its federated cell's Flower SuperExec runs (in a Ray worker's tree)."""
    def fault(proc: subprocess.Popen, ws: Workspace) -> None:
        probe = psutil.Process(proc.pid).environ()[PROBE_ENV]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if any("flower-superexec" in " ".join(p.cmdline()) for p in probe_processes(probe) if p.is_running()):
                break
            time.sleep(1)
        time.sleep(5)
        ws.killed_at = time.time()
        proc.send_signal(signum)
    return fault


# -- leakage, names, bounds and messages (each case one class of problem; see the README's "Failures")


def _train_and_test(rows: list[list[str]]) -> tuple[list[str], list[str]]:
    return next(r for r in rows if r[3] == "train"), next(r for r in rows if r[3] == "test")


def _train_clip_in_test(link: Callable[[Path, Path], object]) -> Callable[[Workspace], list[str]]:
    """A test row naming `link(train clip, new path)`: a hard link or a byte-identical copy of a train clip."""
    def setup(ws: Workspace) -> list[str]:
        def edit(rows: list[list[str]]) -> None:
            train, test = _train_and_test(rows)
            link(Path(train[0]), ws.root / "same.wav")
            test[0] = str(ws.root / "same.wav")
        return ["data-stats", str(ws.config(manifest=ws.manifest(edit)))]
    return setup


def _folder_corpus_with_special_files(ws: Workspace) -> list[str]:
    """A FIFO (opening it blocks forever) and a /dev/zero link (reading it never ends), both named .wav."""
    args = _folder_corpus_with_extra_files(ws)
    os.mkfifo(ws.root / "folder" / "train" / "flat" / "pipe.wav")
    os.symlink("/dev/zero", ws.root / "folder" / "train" / "rising" / "zero.wav")
    return args


def _new_clip_row(name: str, label: str = "flat", speaker: str = "spkX", part: str = "train"):
    """A manifest edit adding a clip of its own (random, so no copy of another) under file name `name`."""
    def edit(ws: Workspace) -> Callable[[list[list[str]]], None]:
        path = ws.wav(name, 0.1 * np.random.default_rng(7).standard_normal(16000).astype(np.float32))
        return lambda rows: rows.append([str(path), label, speaker, part])
    return lambda ws: ["data-stats", str(ws.config(manifest=ws.manifest(edit(ws))))]


def _fifo_row(ws: Workspace) -> list[str]:
    os.mkfifo(ws.root / "fifo.wav")
    return ["data-stats", str(ws.config(manifest=ws.manifest(lambda rows: rows[1].__setitem__(0, str(ws.root / "fifo.wav")))))]


def _resumable_run(damage: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    """An earlier run saved without a config key added later (robustness), an intact round zip, then `damage`."""
    def setup(ws: Workspace) -> list[str]:
        import shutil

        from dsl_fed.config import load_config

        config = ws.config()
        run = ws.earlier_run()
        saved = load_config(config).to_dict()
        del saved["robustness"]
        (run / "config.yaml").write_text(yaml.safe_dump(saved))
        shutil.make_archive(str(ws.root / "m"), "zip", ws.root, config.name)
        shutil.move(ws.root / "m.zip", run / "round_1" / "model.keras")
        damage(run)
        return ["simulate", str(config), "--resume"]
    return setup


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-30])


def _model_with_fewer_classes(ws: Workspace) -> Path:
    """The exported model beside a manifest.json that lists one class fewer than the model outputs."""
    import json
    import shutil

    tflite = _tflite(ws)
    folder = ws.root / "export"
    folder.mkdir()
    shutil.copy(tflite, folder / "model.tflite")
    manifest = json.loads((tflite.parent / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "model.tflite"


def _devel_without(label: str) -> Callable[[list[list[str]]], None]:
    return lambda rows: [r.__setitem__(3, "test") for r in rows if r[3] == "devel" and r[1] == label]


CASES: list[Case] = [
    # config values
    Case("learning rate inf", _override("training.learning_rate=inf"), "training.learning_rate: must be a finite"),
    Case("ARELU beta nan", _override("model.arelu_beta=nan"), "model.arelu_beta: must be a finite"),
    Case("chunk 1e9 s (terabytes)", _override("data.chunk_seconds=1e9"), "data.chunk_seconds: must be in"),
    Case("chunk inf", _override("data.chunk_seconds=inf"), "data.chunk_seconds: must be a finite"),
    Case("hop 1e400 (overflows to inf)", _override("data.hop_seconds=1e400"), "data.hop_seconds: must be a finite"),
    Case("epochs 1e30", _override("training.phase1_epochs=1000000000000000000000000000000"), "training.phase1_epochs"),
    Case("negative batch", _override("training.batch_size=-1"), "training.batch_size"),
    Case("units 1e9", _override("model.units=1000000000"), "model.units"),
    Case("server lr -inf", _override("federated.server_learning_rate=-inf"), "federated.server_learning_rate"),
    Case("output.name=..", _override("output.name=.."), "output.name"),
    Case("output.name=../x", _override("output.name=../x"), "output.name"),
    Case("output.name hidden", _override("output.name=.x"), "output.name"),
    Case("override without =", _override("training.batch_size"), "expected section.key=value"),
    Case("unknown key typo", _override("training.lerning_rate=0.1"), "did you mean training.learning_rate"),
    # config files
    Case("duplicate YAML key", _yaml_text(b"data:\n  manifest: MANIFEST\n  manifest: MANIFEST\n"), "duplicate key 'manifest'"),
    Case("latin-1 config", _yaml_text(b"data:\n  manifest: MANIFEST  # caf\xe9\n"), "not UTF-8"),
    Case("YAML key on: (a bool)", _yaml_text(b"on:\n  x: 1\n"), "is not a name"),
    Case("YAML key 1: (an int)", _yaml_text(b"data:\n  1: 2\n"), "is not a name"),
    Case("YAML list at top", _yaml_text(b"- a\n- b\n"), "expected a mapping"),
    Case("config is a folder", lambda ws: ["data-stats", str(ws.root)], "config file not found"),
    Case("config missing", lambda ws: ["data-stats", str(ws.root / "nope.yaml")], "config file not found"),
    # protocol-breaking data
    Case("same file via a/../a", _with_manifest(lambda rows: _same_file_spelt(
        rows, lambda p: str(Path(p).parent / ".." / Path(p).parent.name / Path(p).name))), "is the same file as"),
    Case("same file via ./", _with_manifest(lambda rows: _same_file_spelt(
        rows, lambda p: str(Path(p).parent) + "/./" + Path(p).name)), "is the same file as"),
    Case("same file via symlink", lambda ws: (os.symlink(ws.corpus / next(
        line.split(",")[0] for line in (ws.corpus / "manifest.csv").read_text().splitlines()[1:] if ",train" in line),
        ws.root / "link.wav"), _with_manifest(lambda rows: next(r for r in rows if r[3] == "test").__setitem__(
            0, str(ws.root / "link.wav")))(ws))[1], "is the same file as"),
    Case("speaker in train and devel", _with_manifest(lambda rows: next(r for r in rows if r[3] == "devel").__setitem__(
        2, next(r for r in rows if r[3] == "train")[2])), "data.allow_speaker_overlap"),
    Case("speaker overlap allowed: warns", _with_manifest(lambda rows: next(r for r in rows if r[3] == "devel").__setitem__(
        2, next(r for r in rows if r[3] == "train")[2]), "data.allow_speaker_overlap=true"),
        "WARNING: 1 speaker(s)", kind="warn"),
    Case("labels Rising and rising", _with_manifest(lambda rows: next(r for r in rows if r[1] == "rising").__setitem__(
        1, "Rising")), "only in case"),
    Case("empty devel", _with_manifest(lambda rows: [r.__setitem__(3, "test") for r in rows if r[3] == "devel"]),
         "partition 'devel' is empty"),
    Case("folder corpus: .aiff ignored, counted", _folder_corpus_with_extra_files, "ignored 1 file(s)", kind="warn"),
    # audio
    Case("1-sample clip: warns", _audio_case(np.zeros(1, np.float32)), "shorter than 10 ms", kind="warn"),
    Case("header claims 1 Hz", _audio_case(np.zeros(100, np.float32), rate=1), "the header claims 1 Hz"),
    Case("stereo 3e38 floats (inf when mixed)", _audio_case(np.full((1600, 2), 3e38, np.float32), subtype="FLOAT"),
         "sample values reach"),
    Case("NaN samples", _audio_case(np.full(1600, np.nan, np.float32), subtype="FLOAT"), "NaN/inf"),
    Case("corrupt wav", lambda ws: (ws.root.joinpath("bad.wav").write_bytes(b"RIFF0000WAVEfmt junk" * 5),
         ["data-stats", str(ws.config(manifest=ws.manifest(lambda rows: rows[1].__setitem__(0, str(ws.root / "bad.wav")))))])[1],
         "cannot decode audio"),
    # edges: OS errors, pipes
    Case("demo data under a file", lambda ws: (ws.root.joinpath("f").write_text("x"),
                                              ["make-demo-data", str(ws.root / "f" / "d")])[1], "is a file, not a folder"),
    Case("data-stats | true (reader gone)", lambda ws: ["data-stats", str(ws.config())], "output pipe closed",
         shell_tail="| true"),
    # runs: refused, resumable, locked; the earlier run must survive
    Case("simulate over an existing run", _earlier_run_then(lambda ws: ["simulate", str(ws.config())]),
         "pass --overwrite", protect="run"),
    Case("simulate --resume, no run", lambda ws: ["simulate", str(ws.config()), "--resume"],
         "no complete round to resume", leaves_nothing=True),
    Case("simulate with empty devel", lambda ws: ["simulate", str(ws.config(manifest=ws.manifest(
        lambda rows: [r.__setitem__(3, "test") for r in rows if r[3] == "devel"])))], "partition 'devel' is empty",
        leaves_nothing=True),
    Case("simulate --resume, changed config", _resume_changed_config, "resuming needs the same config", protect="run"),
    Case("simulate --overwrite with empty devel", _earlier_run_then(lambda ws: ["simulate", str(ws.config(
        manifest=ws.manifest(lambda rows: [r.__setitem__(3, "test") for r in rows if r[3] == "devel"]))), "--overwrite"]),
        "partition 'devel' is empty", protect="run"),
    Case("second writer of a run", _locked_run, "is writing this run"),
    # one lock, staging and overwrite discipline for every command that writes
    Case("deploy local while another writes the name", _while_locked(_then(_deploy_workdir, lambda ws: [
        "deploy", "local", str(ws.config()), "--nodes", "2"])), "is writing this run", protect="run.deploy"),
    Case("experiment while another writes the name", _while_locked(_then(_user_files("run", "experiment/results.csv"),
        lambda ws: ["experiment", str(ws.config()), "--mode", "central"])), "is writing this run", protect="run"),
    Case("deploy local over an existing run", _earlier_run_then(lambda ws: ["deploy", "local", str(ws.config()),
        "--nodes", "2"]), "pass --overwrite", protect="run"),
    Case("deploy local --resume --overwrite", lambda ws: ["deploy", "local", str(ws.config()), "--resume",
        "--overwrite"], "give one of them", leaves_nothing=True),
    Case("simulate after SIGKILL left a finished round", _then(_killed_attempt, lambda ws: [
        "simulate", str(ws.config())]), "--resume to continue it"),
    Case("simulate --resume after SIGKILL left a finished round", _then(lambda ws: _killed_attempt(
        ws, "training.learning_rate=0.1"), lambda ws: ["simulate", str(ws.config()), "--resume"]),
        "resuming needs the same config, but training.learning_rate changed"),
    Case("simulate --overwrite onto a folder that is no run", _then(_user_files("run", "experiment/results.csv"),
        lambda ws: ["simulate", str(ws.config()), "--overwrite"]), "is not a dsl_fed run", protect="run"),
    Case("a lock file that is not ours", _then(lambda ws: (ws.runs.mkdir(), ws.runs.joinpath(".run.lock").write_text(
        "notes\n")), lambda ws: ["simulate", str(ws.config())]), "is not a dsl_fed lock file"),
    Case("evaluate MODEL --json MODEL", _then(_user_files("model", "m.keras"), lambda ws: [
        "evaluate", str(ws.runs / "model" / "m.keras"), "--config", str(ws.config()), "--json",
        str(ws.runs / "model" / "m.keras")]), "an input of this command", protect="model"),
    Case("evaluate --json onto a user's file", _then(_user_files("notes", "n.json"), lambda ws: [
        "evaluate", "m.keras", "--config", str(ws.config()), "--json", str(ws.runs / "notes" / "n.json")]),
        "is not an earlier --json file", protect="notes"),
    Case("export --out onto a user's .tflite", _then(_user_files("mine", "m.tflite"), lambda ws: [
        "export", "m.keras", "--out", str(ws.runs / "mine" / "m.tflite")]), "is not an earlier exported model",
        protect="mine"),
    Case("export into a folder with a user's manifest.json", _then(_user_files("mine", "manifest.json"), lambda ws: [
        "export", "m.keras", "--out", str(ws.runs / "mine" / "model.tflite")]), "is not an earlier export manifest",
        protect="mine"),
    Case("stats beside a user's <model>_stats.md", _then(_user_files("mine", "m.tflite", "m_stats.md"), lambda ws: [
        "stats", str(ws.runs / "mine" / "m.tflite")]), "is not an earlier statistics table", protect="mine"),
    Case("make-demo-data into a DIR with a user's manifest.csv", _then(_user_files("d", "manifest.csv"), lambda ws: [
        "make-demo-data", str(ws.runs / "d")]), "manifest.csv was not written by dsl_fed", protect="d"),
    Case("deploy split beside a user's .OUT.partial", _then(_user_files(".out.partial", "keep.txt"), lambda ws: [
        "deploy", "split", str(ws.corpus / "manifest.csv"), str(ws.runs / "out"), "--nodes", "2"]),
        "audio files + manifest.csv", kind="ok", protect=".out.partial"),
    Case("deploy certs beside a user's .DIR.partial-*", _then(_user_files(".keys.partial-abcd1234", "keep.txt"),
        lambda ws: ["deploy", "certs", str(ws.runs / "keys"), "--host", "127.0.0.1", "--nodes", "1"]), "node key pair",
        kind="ok", protect=".keys.partial-abcd1234"),
    # leakage checks: identity, content, spelling, invisible characters, unscored classes, special files
    Case("train clip hard-linked as a test clip", _train_clip_in_test(lambda src, dst: os.link(src, dst)),
         "is the same file as"),
    Case("byte-identical copy of a train clip in test", _train_clip_in_test(
        lambda src, dst: dst.write_bytes(src.read_bytes())), "is a byte-identical copy of"),
    Case("speakers SPK02 (test) and spk02 (train)", _with_manifest(lambda rows: (
        _train_and_test(rows)[1].__setitem__(2, _train_and_test(rows)[0][2].upper()))), "only in case"),
    Case("label rising + U+200B (zero-width space)", _with_manifest(lambda rows: next(
        r for r in rows if r[1] == "rising").__setitem__(1, "rising\u200b")), "contains U+200B ZERO WIDTH SPACE"),
    Case("speaker with U+2028 (line separator)", _with_manifest(lambda rows: rows[0].__setitem__(2, "spk\u2028x")),
         "contains U+2028 LINE SEPARATOR"),
    Case("data.classes with U+200B", _override("data.classes=up,up\u200b"), "data.classes: class"),
    Case("class absent from devel: warns", _with_manifest(_devel_without("rising")),
         "trained classes never scored: 'rising' (no devel clips)", kind="warn"),
    Case("folder corpus: FIFO and /dev/zero link counted", _folder_corpus_with_special_files, "ignored 3 file(s)",
         kind="warn"),
    Case("manifest row naming a FIFO", _fifo_row, "is not a regular file"),
    Case("deploy certs --host 'bad host!'", lambda ws: ["deploy", "certs", str(ws.root / "k"), "--host", "bad host!",
                                                        "--nodes", "1"], "not a valid host name"),
    Case("deploy certs --host ''", lambda ws: ["deploy", "certs", str(ws.root / "k"), "--host", "", "--nodes", "1"],
         "--host '': empty"),
    Case("deploy certs --host münchen.example (IDN)", lambda ws: ["deploy", "certs", str(ws.root / "k"), "--host",
         "münchen.example", "--nodes", "1"], "xn--mnchen-3ya.example"),
    # bounds for every number a user can type
    Case("training.seed=-1", _override("training.seed=-1"), "training.seed: must be in [0, 4294967295]"),
    Case("training.seed=2^32", _override("training.seed=4294967296"), "training.seed: must be in"),
    Case("data.seed=-1", _override("data.seed=-1"), "data.seed: must be in"),
    Case("federated.num_malicious=1e30", _override("federated.num_malicious=1000000000000000000000000000000"),
         "federated.num_malicious: must be in"),
    Case("window 1000 ms, chunk 0.1 s (was 23 GB)", _override("spectrogram.window_ms=1000", "data.chunk_seconds=0.1"),
         "longer than a chunk"),
    Case("window 1000 ms (a 1 GB STFT kernel)", _override("spectrogram.window_ms=1000"), "at most 4096"),
    Case("STFT hop of one sample", _override("spectrogram.hop_fraction=0.0001", "data.chunk_seconds=60",
                                             "data.hop_seconds=60"), "spectrogram.hop_fraction: gives"),
    Case("manifest cell of 200 000 characters", _with_manifest(lambda rows: rows[1].__setitem__(1, "x" * 200_000)),
         "a value longer than 131072 characters"),
    Case("experiment --seeds 1000000", lambda ws: ["experiment", str(ws.config()), "--seeds", "1000000"],
         "--seeds: must be in [1, 1000]"),
    Case("experiment grid x seeds over 1000 cells", lambda ws: ["experiment", str(ws.config()), "--seeds", "600"],
         "= 4800 cells; at most 1000"),
    Case("experiment grid of 10^9 settings", lambda ws: ["experiment", str(ws.config()), *(
        f"--grid={key}={','.join(map(str, range(1, 1001)))}"
        for key in ("training.batch_size", "training.phase1_epochs", "model.units"))], "= 1000000000 settings"),
    Case("predict --threads 100000 (was SIGSEGV)", lambda ws: ["predict", "m.tflite", "a.wav", "--threads", "100000"],
         "--threads: must be in [1, "),
    Case("stats --runs 0", lambda ws: ["stats", "m.tflite", "--runs", "0"], "--runs: must be in [1, 100000]"),
    Case("make-demo-data --speakers 10^9", lambda ws: ["make-demo-data", str(ws.root / "d"), "--speakers", "1000000000"],
         "--speakers: must be in [3, 1000]"),
    Case("deploy split --seed -1", lambda ws: ["deploy", "split", str(ws.corpus / "manifest.csv"), str(ws.root / "o"),
                                               "--nodes", "2", "--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    Case("deploy local --nodes 100000", lambda ws: ["deploy", "local", str(ws.config()), "--nodes", "100000"],
         "--nodes: must be in [1, 256]"),
    Case("unknown option: one line", lambda ws: ["data-stats", str(ws.config()), "--frobnicate"],
         "unrecognized arguments: --frobnicate"),
    # messages that say what is wrong and what was meant
    Case("partition 'validation'", _with_manifest(lambda rows: rows[-1].__setitem__(3, "validation")),
         "did you mean 'devel'?"),
    Case("partition 'training'", _with_manifest(lambda rows: rows[-1].__setitem__(3, "training")),
         "did you mean 'train'?"),
    Case("file name with U+2028 (a valid CSV)", _new_clip_row("a\u2028b.wav"), "clips", kind="ok"),
    Case("simulate federated.client_cpus=64 on this machine", lambda ws: [
        "simulate", str(ws.config()), "federated.client_cpus=64"], "federated.client_cpus=64 but the simulation has",
        leaves_nothing=True),
    Case("experiment: client_cpus above cpus_per_cell", lambda ws: [
        "experiment", str(ws.config()), "federated.client_cpus=2", "--mode", "federated"],
        "(experiment.cpus_per_cell), so no client could start"),
    Case("--resume, saved config lacks a later key; history column renamed", _resumable_run(
        lambda run: (run / "history.csv").write_text("Round,devel_uar\n1,0.5\n")), "no whole number in column 'round'",
        protect="run"),
    Case("--resume, saved config lacks a later key; round model truncated", _resumable_run(
        lambda run: _truncate(run / "round_1" / "model.keras")), "model.keras: damaged", protect="run"),
    # need TensorFlow
    Case("train over an existing run", _earlier_run_then(lambda ws: ["train", "--central", str(ws.config())]),
         "pass --overwrite", fast=False, protect="run"),
    Case("train --overwrite, corrupt devel file", _earlier_run_then(lambda ws: (ws.root.joinpath("bad.wav").write_bytes(
        b"junk" * 10), ["train", "--central", str(ws.config(manifest=ws.manifest(lambda rows: next(
            r for r in rows if r[3] == "devel").__setitem__(0, str(ws.root / "bad.wav"))))), "--overwrite"])[1]),
        "cannot decode audio", fast=False, protect="run"),
    Case("train, model.weights file missing: no run folder", lambda ws: ["train", "--central", str(ws.config()),
        "model.weights=missing.weights.h5"], "weights file", fast=False, leaves_nothing=True),
    Case("evaluate MODEL --config C k=v", lambda ws: ["evaluate", str(_trained_model(ws)), "--config", str(ws.config()),
                                                      "training.batch_size=8"], "test: UAR", kind="ok", fast=False),
    Case("evaluate --json under a file", lambda ws: (ws.root.joinpath("f").write_text("x"), [
        "evaluate", str(_trained_model(ws)), "--config", str(ws.config()), "--json", str(ws.root / "f" / "m.json")])[1],
        "is a file, not a folder", fast=False),
    Case("corrupt .keras", lambda ws: (ws.root.joinpath("bad.keras").write_bytes(b"PK junk"), [
        "evaluate", str(ws.root / "bad.keras"), "--config", str(ws.config())])[1], "damaged or not a Keras model",
        fast=False),
    Case("export a NaN model", lambda ws: ["export", str(_nan_model(ws))], "non-finite", fast=False),
    Case("predict | head -1 (broken pipe)", lambda ws: ["predict", str(_tflite(ws)), str(ws.corpus / "audio")],
         "output pipe closed", kind="pipe", fast=False, shell_tail="| head -1"),
    Case("plot --out under a file", lambda ws: (ws.root.joinpath("f").write_text("x"), [
        "plot", str(next(ws.corpus.rglob("*.wav"))), "--out", str(ws.root / "f" / "png")])[1], "Not a directory",
        fast=False),
    Case("predict: manifest.json lists fewer classes than the model", lambda ws: [
        "predict", str(_model_with_fewer_classes(ws)), str(next(ws.corpus.rglob("*.wav")))],
        "lists 2 classes (falling, flat) but", fast=False),
    Case("evaluate a devel without one trained class: warns", lambda ws: [
        "evaluate", str(_trained_model(ws)), "--config", str(ws.config(manifest=ws.manifest(_devel_without("rising")))),
        "--partition", "devel"], "devel has no clips of the trained class(es) rising", kind="warn", fast=False),
    # signals
    Case("Ctrl-C while importing", lambda ws: ["train", "--central", str(ws.config())], "interrupted", kind="signal",
         fast=False, fault=_signal_while_importing(signal.SIGINT)),
    Case("SIGTERM while importing", lambda ws: ["train", "--central", str(ws.config())], "terminated", kind="signal",
         fast=False, fault=_signal_while_importing(signal.SIGTERM)),
    Case("SIGKILL of make-speech-data while its workers synthesise", lambda ws: [
        "make-speech-data", str(ws.runs / "big"), "--task", "arousal", "--speakers", "400"], "", kind="signal",
        fault=_sigkill_after(4.0)),
    # faults during a federated run (each starts Flower)
    Case("SIGTERM of simulate --overwrite", _earlier_run_then(lambda ws: [
        "simulate", str(ws.config(federated={"phase1_rounds": 3})), "--overwrite"]), "terminated", kind="signal",
        fast=False, flower=True, protect="run", fault=_sigterm_when_round_starts),
    Case("SIGKILL of simulate --overwrite", _earlier_run_then(lambda ws: [
        "simulate", str(ws.config(federated={"phase1_rounds": 3})), "--overwrite"]), "", kind="signal",
        fast=False, flower=True, protect="run", fault=_sigkill_when_round_starts),
    Case("normal simulate: nothing left running", lambda ws: ["simulate", str(ws.config())], "round 1/1",
         kind="ok", fast=False, flower=True),
    Case("simulate SIGKILLed after round 1, then --resume", _first_run_stopped_after_round_1(
        ["simulate"], signal.SIGKILL), "round 3/3", kind="ok", fast=False, flower=True, in_suite=False),
    Case("deploy local SIGTERMed after round 1, then --resume", _first_run_stopped_after_round_1(
        ["deploy", "local", "--nodes", "2"], signal.SIGTERM), "round 3/3", kind="ok", fast=False, flower=True,
        in_suite=False),
    Case("SIGKILL of experiment during a federated cell", lambda ws: ["experiment", str(ws.config()), "--mode",
        "federated", "--grid", "augment.cutmix=false"], "", kind="signal", fast=False, flower=True, in_suite=False,
        fault=_signal_during_federated_cell(signal.SIGKILL)),
    Case("SIGTERM of experiment during a federated cell", lambda ws: ["experiment", str(ws.config()), "--mode",
        "federated", "--grid", "augment.cutmix=false"], "terminated", kind="signal", fast=False, flower=True,
        in_suite=False, fault=_signal_during_federated_cell(signal.SIGTERM)),
]


# ------------------------------------------------------------------------------------------------ running


def interruptible() -> None:
    """Give the command Ctrl-C as in a terminal: a background job (``cmd &``) inherits SIGINT ignored, and
    Python then never raises KeyboardInterrupt, so the signal cases would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_case(case: Case, ws: Workspace, timeout: float = 900) -> Outcome:
    """Run one case in `ws` and judge it."""
    start = time.perf_counter()
    args = case.setup(ws)
    protected = ws.runs / case.protect if case.protect else None
    before = tree_hash(protected) if protected else None
    probe = uuid.uuid4().hex
    env = {**os.environ, PROBE_ENV: probe, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dsl_fed", *args]
    if case.shell_tail:  # the exit code of dsl_fed, not of the pipe's reader
        cmd = ["bash", "-c", f"{shlex.join(cmd)} {case.shell_tail}; exit ${{PIPESTATUS[0]}}"]
    proc = subprocess.Popen(cmd, cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    if case.fault is not None:
        case.fault(proc, ws)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    code, ended = proc.returncode, time.time()  # SIGTERM: the command may still write while it cleans up
    holder = getattr(ws, "holder", None)
    if holder is not None:
        holder.kill()
        holder.wait()
    left = wait_gone(probe, 60) + [p for extra in getattr(ws, "probes", []) for p in wait_gone(extra, 5)]
    verdict = _verdict(case, code, out, err)
    if verdict == "clean" and case.leaves_nothing and (ws.runs / "run").exists():
        verdict = "messy"
    outcome = Outcome(case, verdict, processes_left=len(left), seconds=time.perf_counter() - start)
    outcome.detail = (err.strip().splitlines() or [""])[-1][:160]
    if protected is not None:
        outcome.run_lost = tree_hash(protected) != before
    killed_at = getattr(ws, "killed_at", None)
    if killed_at is not None:
        died = max(killed_at, ended)
        outcome.rounds_after_death = sum(1 for p in ws.runs.rglob("*") if p.is_file() and p.stat().st_mtime > died + 2)
    for proc_left in left:
        proc_left.kill()
    return outcome


# TensorFlow 2.21's native start-up log, written to the stderr descriptor before any log level applies. `dsl_fed`
# drops it (dsl_fed/quiet.py), so the verdicts count it like any other extra line.
_TF_STARTUP = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I0000 \d\d:\d\d:\S+\s+\d+ port\.cc)")


def _verdict(case: Case, code: int, out: str, err: str) -> str:
    if "Traceback (most recent call last)" in err:
        return "traceback"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if case.kind == "error":
        if code == 0:
            return "silent"
        ok = code == 2 and len(lines) == 1 and ": error: " in lines[0] and case.expect in lines[0]
        return "clean" if ok else "messy"
    if case.kind == "pipe":  # the reader left early: quiet success, or one line if a write hit the closed pipe
        ok = (code == 0 and not lines) or (code == 2 and len(lines) == 1 and case.expect in lines[0])
        return "clean" if ok else "messy"
    if case.kind == "warn":
        if code != 0:
            return "messy"
        return "clean" if case.expect in out + err else "silent"
    if case.kind == "signal":
        return "clean" if code in (130, 143, -signal.SIGKILL) and case.expect in err and len(lines) <= 3 else "messy"
    return "clean" if code == 0 and case.expect in out + err else "messy"


def make_corpus(folder: Path) -> Path:
    from dsl_fed.data.demo import make_demo_corpus

    return make_demo_corpus(folder, speakers=6, clips=2, seed=0, progress=False).parent


def summarise(outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "cases": len(outcomes),
        "clean": sum(o.verdict == "clean" for o in outcomes),
        "tracebacks": sum(o.verdict == "traceback" for o in outcomes),
        "silent acceptances": sum(o.verdict == "silent" for o in outcomes),
        "messy errors": sum(o.verdict == "messy" for o in outcomes),
        "runs lost": sum(o.run_lost for o in outcomes),
        "processes left": sum(o.processes_left for o in outcomes),
        "rounds written after death": sum(o.rounds_after_death for o in outcomes),
    }


def render(outcomes: list[Outcome], totals: dict[str, int], flags: str) -> str:
    bad = {k: v for k, v in totals.items() if k not in ("cases", "clean") and v}
    verdict = "all zeros: PASS" if not bad else "FAIL: " + ", ".join(f"{k} {v}" for k, v in bad.items())
    lines = [
        "# Robustness probe of the `dsl_fed` CLI",
        "",
        f"`python benchmarks/robustness_cli.py{flags}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (the seconds column depends on it; the counts do not).",
        "",
        "| " + " | ".join(totals) + " |",
        "|" + "---|" * len(totals),
        "| " + " | ".join(str(v) for v in totals.values()) + " |",
        "",
        f"Verdict: {verdict}.",
        "",
        "| case | verdict | run lost | processes left | s | last stderr line |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")
        lines.append(f"| {o.case.name} | {o.verdict} | {'yes' if o.run_lost else ''} | {o.processes_left or ''} | "
                     f"{o.seconds:.1f} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the cases that need no TensorFlow")
    parser.add_argument("--no-flower", action="store_true", help="skip the cases that start a Flower simulation")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"markdown report (default {RESULTS})")
    args = parser.parse_args()
    import tempfile

    cases = [c for c in CASES if (c.fast or not args.fast) and not (c.flower and args.no_flower)]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="dsl_fed-robustness-") as tmp:
        corpus = make_corpus(Path(tmp) / "corpus")
        for i, case in enumerate(cases, 1):
            outcome = run_case(case, Workspace(Path(tmp) / f"case{i:03d}", corpus))
            print(f"[{i}/{len(cases)}] {case.name}: {outcome.verdict}"
                  f"{', RUN LOST' if outcome.run_lost else ''}"
                  f"{f', {outcome.processes_left} processes left' if outcome.processes_left else ''} "
                  f"({outcome.seconds:.1f} s)", flush=True)
            outcomes.append(outcome)
    totals = summarise(outcomes)
    flags = " --fast" * args.fast + " --no-flower" * args.no_flower
    report = render(outcomes, totals, flags)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0 if all(v == 0 for k, v in totals.items() if k not in ("cases", "clean")) else 1


if __name__ == "__main__":
    sys.exit(main())
