"""Run the Flower apps of this repo with `flwr run` on a local simulation SuperLink we start and stop ourselves.

Why not the managed ``:local:`` SuperLink that `flwr run` starts on demand: it keeps running after the run,
installs the app's dependencies (TensorFlow) into ``$FLWR_HOME/runtime-envs`` on every new app version, and
listens on fixed ports. Here the SuperLink is started with ``--disable-runtime-dependency-installation`` on
free ports under a private ``FLWR_HOME``, and stopped (with every process it spawned: SuperExec, the
simulation, Ray) when the run ends, fails or is interrupted. The apps themselves run exactly as under
``flwr run . <connection> --stream``.

Nothing here imports Flower: it drives the ``flwr`` / ``flower-superlink`` executables.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import psutil

from dsl_fed.errors import DslFedError
from dsl_fed.federated.run_config import PROGRESS_MARK
from dsl_fed.federated.watchdog import end_processes
from dsl_fed.ray_env import ray_environment

CONNECTION = "dsl-fed"  # the SuperLink connection name written into the private FLWR_HOME
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_RECORD = re.compile(r"^[A-Z]+\s+:\s+" + re.escape(PROGRESS_MARK) + r"(.*)$")  # "INFO :      [dsl_fed] ..."

# Child processes inherit these: quiet TensorFlow, no dependency installs, no update checks.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "RAY_DEDUP_LOGS": "0",
    # The simulation starts its own Ray instance, on loopback: without this, Ray would join whatever cluster a
    # `ray start` on this machine last registered (or RAY_ADDRESS names); `dsl_fed simulate --ray-address`
    # replaces it with the cluster's.
    **ray_environment(None),
}


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def terminate_tree(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM `pid` and all its descendants, wait for them, SIGKILL whatever is left.

    The descendants are collected first because SuperExec leaves its parent's session and process group, and
    becomes unreachable through the tree once its parent is gone.
    """
    terminate_trees([pid], timeout)


def terminate_trees(pids: Sequence[int], timeout: float = 20.0) -> None:
    """`terminate_tree` for several processes at once: they shut down side by side, not one after the other."""
    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    end_processes(procs, timeout)


def stop_process_tree(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """`terminate_tree` for a child of ours, then reap it."""
    stop_process_trees([proc], timeout)


def stop_process_trees(procs: Sequence[subprocess.Popen], timeout: float = 20.0) -> None:
    """`stop_process_tree` for several children of ours at once."""
    terminate_trees([proc.pid for proc in procs], timeout)
    for proc in procs:
        proc.wait()


@contextlib.contextmanager
def local_superlink(flwr_home: Path, log_file: Path, startup_timeout: float = 60.0,
                    env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start a simulation SuperLink owned by this process; yield its address; stop it and its children.

    `env` is added to the SuperLink's environment (e.g. the run marker of `dsl_fed.federated.watchdog.guard`).
    """
    exe = executable("flower-superlink")
    port = free_port()
    cmd = [  # one port serves the Control and ServerAppIo APIs (Flower 1.42 deprecates --control-api-address)
        exe, "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--log-file", str(log_file),
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = _flower_env(flwr_home, env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(proc, port, log_file, startup_timeout)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_tree(proc)


def write_connection(flwr_home: Path, address: str) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one insecure SuperLink connection named `CONNECTION`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def flwr_run(
    app_dir: Path,
    flwr_home: Path,
    run_config: Path,
    federation_config: dict[str, int],
    log_file: Path,
    on_line: Callable[[str], None] = lambda line: None,
    connection: str = CONNECTION,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> int:
    """``flwr run APP CONNECTION --stream`` with a run-config TOML file; every output line goes to `log_file`.

    `prefix` runs it through another command (e.g. ``ip netns exec NS``: on the operator's host).

    Returns:
        The exit code of `flwr run` (0 also when the ServerApp failed: check the run's outputs).
    """
    fed = " ".join(f"{k}={v}" for k, v in federation_config.items())
    cmd = [*prefix, executable("flwr"), "run", str(app_dir), connection, "--stream", "--run-config", str(run_config)]
    if fed:
        cmd += ["--federation-config", fed]
    env = _flower_env(flwr_home, env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as log, subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    ) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                on_line(_ANSI.sub("", line.rstrip("\n")))
            return proc.wait()
        except BaseException:
            stop_process_tree(proc)
            raise


def progress_message(line: str) -> str | None:
    """The user-facing part of a streamed ServerApp line, or None for Flower's own chatter.

    Only lines in Flower's log format count: once some library has called `logging.basicConfig`, every record
    is printed a second time as ``INFO:flwr.dsl_fed:...`` by the root logger.
    """
    match = _FLOWER_RECORD.match(line)
    return match.group(1).strip() if match else None


@contextlib.contextmanager
def private_flwr_home() -> Iterator[Path]:
    """A throw-away ``FLWR_HOME`` so runs neither read nor change the user's ``~/.flwr``."""
    path = Path(tempfile.mkdtemp(prefix="dsl_fed-flwr-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _flower_env(flwr_home: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Environment of Flower's processes, with this interpreter's folder first on PATH.

    The SuperLink and SuperExec start further Flower commands by name; without this, an installation that is
    not activated (``venv/bin/dsl_fed simulate``) would run the app in whatever Flower and dsl_fed PATH finds.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **QUIET_ENV, **(extra or {}), "FLWR_HOME": str(flwr_home), "PATH": path}


def executable(name: str) -> str:
    """Flower's command `name`, preferring the one installed beside this Python (venvs, pyenv before a rehash)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DslFedError(f"{name!r} not found on PATH; install Flower with `pip install 'flwr[simulation]==1.42.*'`")
    return found


def _wait_healthy(proc: subprocess.Popen, port: int, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DslFedError(f"flower-superlink exited with code {proc.returncode} at start-up; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise DslFedError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:.0f} s; see {log_file}")

