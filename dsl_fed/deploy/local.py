"""A real Flower deployment on one machine: SuperLink and SuperNodes as separate processes.

Everything runs as it would across machines (`README` "Deploy across machines" lists the same commands): the
SuperLink with TLS, SuperNode authentication and a state database; each SuperNode with the CA certificate,
its own private key and its own data folder (``--node-config data-path=...``); the job submitted with
``flwr run APP CONNECTION --stream`` through a TLS connection entry in a private ``FLWR_HOME``. Flower 1.42
serves the Control API on the SuperLink's port together with the Fleet API and does not authenticate it in the
open-source build, so the SuperLink binds to 127.0.0.1 only. On one host (`deploy_local`) the SuperNodes dial
that address; on separate hosts (network namespaces, `dsl_fed.deploy.netns`) they dial a proxy on the
SuperLink's host that passes only the Fleet API (``fleet_proxy.cfg``, `LoopbackFederation.start_fleet_proxy`).

With ``isolation="process"`` (`deploy_local`'s default) each SuperNode runs one long-lived ClientApp process
beside it (`dsl_fed.deploy.clientapp_worker`), which imports TensorFlow and builds the model once instead of once
per message; ``"subprocess"`` is Flower's own new process per message. `deploy_local` marks every process it
starts (`dsl_fed.federated.watchdog.guard`), so none outlives it, even when it is killed.

Nothing here imports Flower: it drives the ``flower-superlink``, ``flower-supernode`` and ``flwr`` executables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsl_fed.deploy.netns import Host
from dsl_fed.errors import DslFedError
from dsl_fed.io import refuse_existing, run_lock, settle_attempts, staged_run
from dsl_fed.federated.runtime import QUIET_ENV, executable, flwr_run, free_port, stop_process_trees

CONNECTION = "dsl-fed-deploy"  # the connection name in the private FLWR_HOME
WORKDIR_TAG = ".dsl_fed-deploy"  # marks a folder `deploy_local` made (and may replace)
FLEET_PROXY_CONFIG = Path(__file__).with_name("fleet_proxy.cfg")  # haproxy: Fleet API only, see the file
OPERATOR = "superlink"  # the host of the SuperLink, its proxy and the operator's `flwr` commands
NODE_RUNTIME_PORT = 9094  # a SuperNode's Runtime API port on a host of its own (Flower's default)
WORKER = "clientapp"  # suffix of the name of a SuperNode's ClientApp process

# Polls URL (https, CA file) until it answers 200 or SECONDS pass; run on the host that should reach it.
_PROBE = """
import ssl, sys, time, urllib.request
url, ca, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
while time.monotonic() < until:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as response:
            sys.exit(0 if response.status == 200 else 1)
    except OSError:
        time.sleep(0.3)
sys.exit(1)
"""


class LoopbackFederation:
    """SuperLink + SuperNodes with TLS and node authentication; stops all it started on exit.

    Without `hosts` every process runs here and the SuperNodes dial the SuperLink on 127.0.0.1. With `hosts`
    each runs on its own host: the SuperLink, the fleet proxy and the operator's ``flwr`` commands on
    ``hosts["superlink"]`` (the SuperLink still on that host's 127.0.0.1), SuperNode k on ``hosts["node_<k>"]``,
    dialling `fleet_address`.

    Args:
        workdir: Holds ``flwr_home/``, ``logs/`` and the SuperLink's ``state.db``.
        certs: A folder written by `dsl_fed.deploy.certs.write_certificates` (CA, server certificate).
        node_folders: Data folder of SuperNode k (its ``data-path``).
        port: The SuperLink's port (default: a free one). Keep it to restart the SuperLink in place.
        env: Added to the environment of every process started (e.g. the marker of `watchdog.guard`).
        node_keys: SuperNode k's private key, its public key beside it (+ ``.pub``); default ``certs/node_<k>``.
        hosts: Where each process runs (`dsl_fed.deploy.netns.Host`), keyed ``superlink`` and ``node_<k>``.
        fleet_address: What the SuperNodes dial (the proxy's ``host:port``); default the SuperLink's address.
        isolation: ``subprocess`` (default, Flower's): a new ClientApp process per message; ``process``: each
            SuperNode gets one long-lived ClientApp process (`dsl_fed.deploy.clientapp_worker`), see the module.
    """

    def __init__(self, workdir: Path, certs: Path, node_folders: list[Path], port: int | None = None,
                 env: Mapping[str, str] | None = None, node_keys: Sequence[Path] | None = None,
                 hosts: Mapping[str, Host] | None = None, fleet_address: str | None = None,
                 isolation: str = "subprocess") -> None:
        if isolation not in ("process", "subprocess"):
            raise DslFedError(f"isolation {isolation!r}: use 'process' or 'subprocess'")
        self.isolation = isolation
        self.workdir = Path(workdir).absolute()
        self.certs = Path(certs).absolute()
        self.node_folders = [Path(f).absolute() for f in node_folders]
        self.node_keys = [Path(k).absolute() for k in node_keys] if node_keys is not None else [
            self.certs / f"node_{k}" for k in range(len(self.node_folders))]
        self.hosts = dict(hosts or {})
        self.port = port or free_port()
        self.fleet_address = fleet_address or self.address
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr_home"
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_files: dict[str, Path] = {}  # process name -> its log
        self.extra_env = dict(env or {})
        self.env = {**os.environ, **QUIET_ENV, **self.extra_env, "FLWR_HOME": str(self.flwr_home)}
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    @property
    def address(self) -> str:
        """The SuperLink's address on its own host: all its APIs."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- processes

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink (TLS, node authentication, state in ``state.db``) and wait until it answers."""
        self._start("superlink", [
            executable("flower-superlink"),
            "--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.crt"),
            "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
            "--database", str(self.workdir / "state.db"), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--log-file", str(self.logs / "superlink.log"),
        ], host=OPERATOR)
        self._wait_answering("superlink", f"https://{self.address}/health", timeout)

    def start_fleet_proxy(self, listen: str, timeout: float = 30.0) -> None:
        """Start haproxy with ``fleet_proxy.cfg`` on the SuperLink's host, listening on `listen` (``ip:port``):
        it passes the Fleet API (and /health) to the SuperLink and refuses every other path with 403."""
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise DslFedError("haproxy not found on PATH; install it (Debian/Ubuntu: apt-get install haproxy)")
        self._start("fleet_proxy", [haproxy, "-db", "-f", str(FLEET_PROXY_CONFIG)], host=OPERATOR,
                    env={"FLEET_BIND": listen, "SUPERLINK": self.address, "CERTS": str(self.certs)})
        self._wait_answering("fleet_proxy", f"https://{listen}/health", timeout)

    def register(self, k: int, public_key: Path | None = None) -> None:
        """``flwr supernode register KEY.pub``: allow SuperNode k's key (the Control API, over TLS).

        `public_key` defaults to the public key beside SuperNode k's private key (the operator's copy of a site's
        ``node_key.pub`` is enough).
        """
        public = str(public_key or f"{self.node_keys[k]}.pub")
        result = subprocess.run(self._command(OPERATOR, [executable("flwr"), "supernode", "register", public,
                                                         CONNECTION]),
                                env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise DslFedError(f"flwr supernode register {public} failed: {_last_line(result.stdout + result.stderr)}")

    def start_node(self, k: int, key: Path | None = None, root_certificates: bool = True,
                   name: str | None = None) -> subprocess.Popen:
        """Start SuperNode k on its own data folder, authenticated with `key` (default: its own key), and in
        process isolation its ClientApp process (named ``<name>.clientapp``, logging into the node's log).

        `name` (default ``node_<k>``) names the process for `kill` and its log file.
        """
        name = name or f"node_{k}"
        port = NODE_RUNTIME_PORT if self.hosts else free_port()  # one host: a Runtime API port per SuperNode
        cmd = [executable("flower-supernode"), "--superlink", self.fleet_address,
               "--auth-supernode-private-key", str(key or self.node_keys[k]),
               "--node-config", f'data-path="{self.node_folders[k]}"', "--port", str(port),
               "--isolation", self.isolation]
        if root_certificates:
            cmd[3:3] = ["--root-certificates", str(self.certs / "ca.crt")]
        node = self._start(name, cmd, host=f"node_{k}")
        if self.isolation == "process":
            self._start(f"{name}.{WORKER}", [sys.executable, "-m", "dsl_fed.deploy.clientapp_worker",
                                             "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid",
                                             str(node.pid)], host=f"node_{k}", log=name)
        return node

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (``flwr supernode list``)."""
        result = subprocess.run(self._command(OPERATOR, [executable("flwr"), "supernode", "list", CONNECTION,
                                                         "--format", "json"]),
                                env=self.env, capture_output=True, text=True, timeout=120)
        try:
            listed = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for node in listed if str(node.get("status", "")).lower() == "online")

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < n:
            for name in self.processes:
                if name.startswith("node_"):
                    self._check_alive(name)
            if time.monotonic() > deadline:
                raise DslFedError(f"only {self.online_nodes()} of {n} SuperNodes came online within {timeout:.0f} s; "
                                  f"see {self.logs}")
            time.sleep(1)

    def run(self, app_dir: Path, run_config: Path, on_line: Callable[[str], None]) -> int:
        """``flwr run APP dsl-fed-deploy --stream --run-config FILE``; returns its exit code."""
        return flwr_run(app_dir, self.flwr_home, run_config, {}, self.logs / "flower.log", on_line,
                        connection=CONNECTION, env=self.extra_env, prefix=self._command(OPERATOR, []))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one started process and its children (SIGKILL: a crash, nothing gets to clean up), and
        to a SuperNode's ClientApp process with it."""
        procs = [self.processes.pop(n) for n in (name, f"{name}.{WORKER}") if n in self.processes]
        if sig == signal.SIGKILL:
            from dsl_fed.federated.runtime import descendants

            for proc in procs:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
        else:
            stop_process_trees(procs)

    def close(self) -> None:
        """Stop every process started here: the SuperNodes together first (they sign off at the SuperLink), then
        the proxy and the SuperLink with its ServerApp."""
        last = [name for name in ("fleet_proxy", "superlink") if name in self.processes]
        for group in ([name for name in self.processes if name not in last], last):
            stop_process_trees([self.processes.pop(name) for name in group])

    def _command(self, host: str, argv: list[str]) -> list[str]:
        return self.hosts[host].command(argv) if host in self.hosts else argv

    def _start(self, name: str, cmd: list[str], host: str, env: Mapping[str, str] | None = None,
               log: str | None = None) -> subprocess.Popen:
        """Start `cmd` on `host` as process `name`, its output appended to ``logs/<log or name>.log``."""
        self.log_files[name] = self.logs / f"{log or name}.log"
        log = self.log_files[name].open("a")
        try:
            proc = subprocess.Popen(self._command(host, cmd), env={**self.env, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.processes[name] = proc
        return proc

    def _wait_answering(self, name: str, url: str, timeout: float) -> None:
        """Wait until `url` answers 200 on the SuperLink's host, while process `name` is alive."""
        probe = subprocess.Popen(self._command(OPERATOR, [sys.executable, "-c", _PROBE, url,
                                                          str(self.certs / "ca.crt"), str(timeout)]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while probe.poll() is None:
                self._check_alive(name)
                time.sleep(0.2)
        finally:
            if probe.poll() is None:
                probe.kill()
            probe.wait()
        if probe.returncode != 0:
            self._check_alive(name)
            raise DslFedError(f"{name} did not answer on {url} within {timeout:.0f} s; see {self.logs / f'{name}.log'}")

    def _check_alive(self, name: str) -> None:
        code = self.processes[name].poll()
        if code is not None:
            log = self.log_files[name]
            raise DslFedError(f"{name} exited with code {code}: {_last_line(_tail(log))} (log {log})")


def _tail(path: Path, size: int = 4000) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")
    return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def deploy_local(config_path: str | Path, overrides: Sequence[str] = (), nodes: int = 3, resume: bool = False,
                 echo: Callable[[str], None] = print, overwrite: bool = False, isolation: str = "process") -> Path:
    """Split the config's corpus into `nodes` folders, make certificates and keys, run the federated job on a
    loopback federation with TLS and node authentication, and stop everything; returns the run folder.

    The nodes get only their own folders; the server gets no manifest, so it evaluates federated. The class
    list (``data.classes``, else the corpus' train labels) is passed to the run as an override. Node folders,
    keys, the SuperLink database and the logs are in ``<output.directory>/<name>.deploy/`` (replaced on the
    next call). The run itself is written like `dsl_fed simulate`'s: one command per name at a time, a new run
    staged and published when finished (replacing an earlier one only with `overwrite`), a run that stopped
    after a finished round kept for `resume`. `isolation` is the SuperNodes' (`LoopbackFederation`).
    """
    from dsl_fed.cli.federated import has_round
    from dsl_fed.config import load_config
    from dsl_fed.data import load_manifest
    from dsl_fed.data.nodes import check_decodable
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.run_config import check_availability, check_federation_size
    from dsl_fed.privacy import check_speakers

    if resume and overwrite:
        raise DslFedError("--resume continues the existing run and --overwrite replaces it: give one of them")
    config_path = Path(config_path).resolve()
    cfg = load_config(config_path, overrides)
    manifest = load_manifest(cfg.data)
    check_speakers(cfg, manifest)
    check_federation_size(cfg, nodes)
    check_availability(cfg, None)  # the nodes' ids are drawn when their folders are made: only the file is checked
    overrides = [*overrides, f"data.classes={','.join(cfg.data.classes or manifest.classes)}"]
    output_dir = Path(cfg.output.directory).resolve()
    run_dir = output_dir / cfg.output.name
    with run_lock(run_dir):
        settle_attempts(run_dir, has_round)  # what a killed run left: its finished rounds can be resumed
        if resume:  # the checks the ServerApp makes, before any process starts
            RunDirectory(run_dir).check_resume(load_config(config_path, overrides))
        else:
            refuse_existing(run_dir, overwrite, resumable=True)
        check_decodable(manifest.clips, cfg.data.sample_rate)
        if resume:
            _federate(config_path, overrides, output_dir, run_dir, cfg, manifest.source, nodes, resume, echo,
                      isolation)
        else:
            with staged_run(run_dir, overwrite, has_round) as staging:
                _federate(config_path, overrides, staging.parent, staging, cfg, manifest.source, nodes, resume, echo,
                          isolation)
    return run_dir


def _federate(config_path: Path, overrides: list[str], output_dir: Path, run_dir: Path, cfg: Any, corpus: Path,
              nodes: int, resume: bool, echo: Callable[[str], None], isolation: str = "process") -> None:
    """Prepare ``<name>.deploy/``, run the job on a loopback federation writing ``output_dir/<name>``; raises
    unless every round was written."""
    from dsl_fed.cli.federated import ServerLines, check_complete
    from dsl_fed.deploy.certs import write_certificates
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.federated.run_config import run_config_toml, write_app
    from dsl_fed.federated.watchdog import guard

    workdir = Path(cfg.output.directory).resolve() / f"{cfg.output.name}.deploy"
    if workdir.exists():
        if not (workdir / WORKDIR_TAG).is_file():
            raise DslFedError(f"{workdir}: exists but was not made by `dsl_fed deploy local`; move it away")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_TAG).write_text("node folders, keys, state and logs of `dsl_fed deploy local`\n")
    folders = split_corpus(corpus, workdir / "nodes", nodes, cfg.data.seed)
    certs = write_certificates(workdir / "certs", ["127.0.0.1"], nodes)
    run_config = workdir / "run_config.toml"
    run_config.write_text(run_config_toml(config_path, overrides, output_dir, resume))
    lines = ServerLines(echo)
    with guard() as marker, LoopbackFederation(workdir, certs, folders, env=marker, isolation=isolation) as fed:
        fed.start_superlink()
        for k in range(nodes):
            fed.register(k)
            fed.start_node(k)
        fed.wait_for_nodes(nodes)
        echo(f"SuperLink {fed.address} (Fleet, Control and ServerAppIo API, 127.0.0.1 only): TLS on, node "
             f"authentication on; {nodes} SuperNodes with their own data in {workdir / 'nodes'}"
             f"{', one ClientApp process each' if isolation == 'process' else ''}; logs {fed.logs}")
        code = fed.run(write_app(workdir / "app"), run_config, lines)
    check_complete(run_dir, cfg, lines.errors, code, fed.logs / "flower.log")
