"""Reliability: one clear line for every bad input, runs never lost or mixed, no process outlives its command,
non-finite models never pass.

The bad-input and fault table lives in ``benchmarks/robustness_cli.py`` (each case runs the real `dsl_fed`
command in a subprocess); every case is one test here. The cases that need TensorFlow or Flower are slow.
The mechanisms behind them (staging, locking, the watchdog, the divergence guard) have direct tests below.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import benchmark_module

from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write, run_lock, staged_run

REPO = Path(__file__).resolve().parents[1]
probe = benchmark_module.load("robustness_cli")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return probe.make_corpus(tmp_path_factory.mktemp("robustness") / "corpus")


def _run(case, corpus, tmp_path):
    outcome = probe.run_case(case, probe.Workspace(tmp_path / "ws", corpus))
    assert (outcome.verdict, outcome.run_lost, outcome.processes_left, outcome.rounds_after_death) == \
        ("clean", False, 0, 0), outcome.detail
    return outcome


FAST = [c for c in probe.CASES if c.fast and c.in_suite]
FLOWER = [c.name for c in probe.CASES if c.flower and c.in_suite]
SLOW = [c for c in probe.CASES if not c.fast and not c.flower and c.in_suite]


@pytest.mark.parametrize("case", FAST, ids=[c.name for c in FAST])
def test_fast_case(case, corpus, tmp_path):
    _run(case, corpus, tmp_path)


@pytest.mark.slow
def _sigint_blocked(pid: int) -> bool:
    """True while the process holds SIGINT (`dsl_fed.held_signals`: its start-up, after the interpreter's)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_at_any_moment_of_start_up_exits_130_with_one_line(corpus, tmp_path):
    """Interrupts landing inside native imports once ended the process by SIGINT (-2), aborted it (pybind11) or
    were swallowed (the command trained to the end). The clock starts when dsl_fed's own code runs: before
    that, the interpreter is importing `site`, and an interrupt there is Python's own traceback."""
    config = probe.Workspace(tmp_path / "ws", corpus).config()
    outcomes = []
    for k, delay in enumerate([0, 0.05, 0.12, 0.25, 0.45, 0.8, 1.3]):
        proc = subprocess.Popen([sys.executable, "-m", "dsl_fed", "train", "--central", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=probe.interruptible)
        deadline = time.monotonic() + 60
        while not _sigint_blocked(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        ours = [line for line in err.splitlines() if line.strip() and not probe._TF_STARTUP.match(line)]
        outcomes.append((proc.returncode, ours))
    bad = [(k, code, lines) for k, (code, lines) in enumerate(outcomes)
           if not (code == 130 and len(lines) == 1 and lines[0].endswith(": interrupted"))]
    assert bad == [], bad  # (interrupt number, exit code, stderr lines) of each one that did not end cleanly


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c.name for c in SLOW])
def test_case_needing_tensorflow(case, corpus, tmp_path):
    _run(case, corpus, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOWER)
def test_federated_run_leaves_no_process_and_no_late_round(name, corpus, tmp_path):
    """Machine-wide: no process whose environment carries the case's probe value survives (Ray actors included),
    nothing is written into the runs folder after the command died, and the earlier run is byte-identical."""
    case = next(c for c in probe.CASES if c.name == name)
    _run(case, corpus, tmp_path)


# ------------------------------------------------------------------------------------------------ mechanisms


def _earlier(tmp_path: Path) -> tuple[Path, str]:
    run = probe.Workspace(tmp_path, tmp_path).earlier_run()
    return run, probe.tree_hash(run)


def test_a_failed_rerun_leaves_the_earlier_run_byte_identical(tmp_path):
    run, before = _earlier(tmp_path)
    with pytest.raises(DslFedError, match="pass --overwrite"):
        with staged_run(run):
            pass
    with pytest.raises(DslFedError, match=r"disk full \(the earlier run in .* is untouched; this attempt is in"):
        with staged_run(run, overwrite=True) as new:
            (new / "history.csv").write_text("half")
            raise DslFedError("disk full")
    with pytest.raises(KeyboardInterrupt):
        with staged_run(run, overwrite=True) as new:
            (new / "model.keras").write_text("half")
            raise KeyboardInterrupt
    assert probe.tree_hash(run) == before


def test_a_finished_run_replaces_the_earlier_one_and_only_a_resumable_failed_new_name_is_kept(tmp_path):
    run, _ = _earlier(tmp_path)
    with staged_run(run, overwrite=True) as new:
        assert new.name == run.name and new.parent != run.parent and not (new / "latest").exists()
        (new / "model.keras").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == ["model.keras"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no staging or replaced folder left
    with pytest.raises(DslFedError, match="this attempt is in .*until the next run of this name"):
        with staged_run(run.parent / "central") as new:  # e.g. an error found only when the model is built
            raise DslFedError("stopped")
    assert not (run.parent / "central").exists()  # the corrected command is not refused
    with staged_run(run.parent / "central") as new:
        pass
    with pytest.raises(DslFedError, match=r"stopped; see .*/fresh/logs/x.log \(the incomplete run is in .*fresh\)"):
        with staged_run(run.parent / "fresh", resumable=lambda attempt: (attempt / "round_1").is_dir()) as new:
            (new / "round_1").mkdir()
            raise DslFedError(f"stopped; see {new / 'logs' / 'x.log'}")
    assert (run.parent / "fresh" / "round_1").is_dir()  # a federated run can resume from it
    assert sorted(p.name for p in run.parent.iterdir()) == ["central", "fresh", "run"]


def test_a_second_writer_of_a_run_is_refused_until_the_first_ends(tmp_path):
    run = tmp_path / "runs" / "x"
    with run_lock(run):
        with pytest.raises(DslFedError, match=rf"another dsl_fed command \(PID {os.getpid()}\) is writing this run"):
            with run_lock(run):
                pass
    with run_lock(run):  # released
        pass
    assert not list(run.parent.iterdir())  # the lock file goes with its holder


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    run = tmp_path / "runs" / "x"
    holder = subprocess.Popen([sys.executable, "-c", f"import time\nfrom dsl_fed.io import run_lock\nwith run_lock("
                               f"{str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DslFedError, match=f"PID {holder.pid}"):
        with run_lock(run):
            pass
    holder.kill()
    holder.wait()
    with run_lock(run):
        pass


def test_resume_reads_a_saved_config_without_later_keys_and_refuses_a_damaged_run(tmp_path):
    """A key added after the run was saved has its default; what the server reads first is checked before Flower."""
    import shutil

    from dsl_fed.config import from_dict
    from dsl_fed.federated.checkpoint import RunDirectory

    run = probe.Workspace(tmp_path, tmp_path).earlier_run()
    shutil.make_archive(str(tmp_path / "model"), "zip", tmp_path, "runs/run/config.yaml")
    shutil.move(tmp_path / "model.zip", run / "round_1" / "model.keras")  # any intact zip passes the check
    cfg = from_dict({"data": {"manifest": "m.csv"}, "federated": {"dp": {"clip_norm": 2.0}}})
    saved = cfg.to_dict()
    del saved["robustness"], saved["training"]["tensorboard"], saved["federated"]["dp"]["delta"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert RunDirectory(run).check_resume(cfg) == 1
    saved["training"]["learning_rate"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(DslFedError, match="but training.learning_rate changed$"):
        RunDirectory(run).check_resume(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (run / "history.csv").write_text("Round,devel_uar\n1,0.5\n")  # a renamed column
    with pytest.raises(DslFedError, match=r"history.csv line 2: no whole number in column 'round' \(columns: Round, "):
        RunDirectory(run).check_resume(cfg)
    (run / "history.csv").write_text("round,devel_uar\n1,0.5\n")
    model = run / "round_1" / "model.keras"
    model.write_bytes(model.read_bytes()[:-30])  # truncated
    with pytest.raises(DslFedError, match=r"round_1/model.keras: damaged"):
        RunDirectory(run).check_resume(cfg)


def test_a_failed_federated_run_says_why_from_the_log(tmp_path):
    """The root cause of the last traceback chain in Flower's log; an earlier, unrelated traceback is not it."""
    from dsl_fed.cli.federated import failure_reason

    log = tmp_path / "flower.log"
    log.write_text("Traceback (most recent call last):\n  File x\nKeyError: 'old'\nrecovered\n"
                   "Traceback (most recent call last):\n  File y\nValueError: ActorPool is empty. Stopping Simulation.\n"
                   "\nThe above exception was the direct cause of the following exception:\n\n"
                   "Traceback (most recent call last):\n  File z\nRuntimeError: Simulation Runtime crashed.\n")
    assert failure_reason(log) == "ValueError: ActorPool is empty. Stopping Simulation."
    assert failure_reason(tmp_path / "missing.log") is None


def test_clients_needing_more_cpus_than_the_simulation_has_are_refused_before_it_starts():
    from dsl_fed.config import from_dict
    from dsl_fed.federated.run_config import check_client_cpus

    cfg = from_dict({"data": {"manifest": "m.csv"}, "federated": {"client_cpus": 3}})
    check_client_cpus(cfg, ray_cpus=3)
    with pytest.raises(DslFedError, match=r"^federated.client_cpus=3 but the simulation has 2 CPU\(s\) \(experiment"):
        check_client_cpus(cfg, ray_cpus=2)


def test_library_start_up_chatter_is_dropped_unless_verbose(tmp_path):
    """What TensorFlow writes to the stderr descriptor while it loads (a stand-in package writes the same lines):
    its absl notice and INFO lines go, anything else stays; DSL_FED_VERBOSE=1 keeps everything."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1796424882.820301    9389 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'E0000 a real problem\\n')\n")
    code = "from dsl_fed.quiet import quiet_libraries\nquiet_libraries()\nimport tensorflow\nprint('imported')\n"
    env = {k: v for k, v in os.environ.items() if k != "DSL_FED_VERBOSE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), str(REPO)])
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert (quiet.stdout, quiet.stderr) == ("imported\n", "E0000 a real problem\n")
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "DSL_FED_VERBOSE": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert "absl::InitializeLog" in loud.stderr and "oneDNN" in loud.stderr and "a real problem" in loud.stderr


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write(tmp_path / "b.json", "{}").stat().st_mode) == 0o600
    finally:
        os.umask(old)


_GUARDED = """
import subprocess, sys, time
from dsl_fed.federated.watchdog import guard
with guard(cleanup=(sys.argv[1],)) as env:
    import os
    child = subprocess.Popen(["sleep", "600"], env={**os.environ, **env}, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
"""


def ended(proc: psutil.Process, timeout: float) -> bool:
    """Whether `proc` ends within `timeout` s. An orphan killed by the watchdog is reaped by whoever adopted it,
    maybe late on a loaded machine: until then it is a zombie, ended but still listed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "normal"])
def test_marked_processes_end_with_their_command(how, tmp_path):
    """A marked child in a session of its own (unreachable through the process tree, like Ray's daemons) ends
    with the command: by the command's own cleanup, or by the watchdog when the command is SIGKILLed."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = _GUARDED if how != "normal" else _GUARDED.replace("time.sleep(600)", "pass")
    cmd = subprocess.Popen([sys.executable, "-c", script, str(scratch)], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(cmd.stdout.readline()))
    if how != "normal":
        os.kill(cmd.pid, getattr(signal, how))
    cmd.wait(timeout=30)
    assert ended(child, timeout=30)
    if how == "SIGKILL":  # nobody else could have removed the command's temporary folder
        deadline = time.monotonic() + 10
        while scratch.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not scratch.exists()


@pytest.mark.slow
def test_training_that_diverges_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    from dsl_fed.data import load_chunks, load_manifest
    from dsl_fed.models import build_model
    from dsl_fed.train import CHECKPOINT_FILE, train_local

    cfg = tiny_config.replace(**{"training.phase1_epochs": "1", "training.phase2_epochs": "3"})
    manifest = load_manifest(cfg.data)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    devel = load_chunks(manifest.partition("devel"), cfg.data, manifest.classes, progress=False)
    model = build_model(cfg, len(manifest.classes))
    train_local(model, train, devel, cfg, phase=1, run_dir=tmp_path, verbose=0)
    checkpoint = (tmp_path / CHECKPOINT_FILE).read_bytes()
    kernel = next(w for w in model.weights if w.path.endswith("predictions/kernel"))
    kernel.assign(np.full(kernel.shape, np.inf, np.float32))  # what a step with an absurd learning rate leaves
    with pytest.raises(DslFedError, match="training diverged in phase 2, epoch 1: the loss became nan at batch 1"):
        train_local(model, train, devel, cfg, phase=2, run_dir=tmp_path, verbose=0, initial_best=0.0)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == checkpoint
