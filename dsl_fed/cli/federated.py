"""`dsl_fed simulate CONFIG [section.key=value ...] [--resume]`: federated training on a local Flower simulation.

It runs exactly what ``flwr run . <connection> --stream`` runs (the ServerApp and ClientApp of this repo,
reading the same YAML and overrides through the run config) with one virtual SuperNode per training shard,
on a private SuperLink it starts and stops itself (`dsl_fed.federated.runtime`), from an app folder it
generates (`run_config.write_app`), so it needs no checkout of the repo. Flower's own output goes to
``runs/<name>/logs/flower.log``; the terminal gets one line per round.

This module does not import Flower: it drives the ``flwr`` and ``flower-superlink`` executables.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dsl_fed.config import Config, load_config
from dsl_fed.data.manifest import load_manifest
from dsl_fed.errors import DslFedError
from dsl_fed.io import refuse_existing, run_lock, settle_attempts, staged_run
from dsl_fed.ray_env import check_ray_address, ray_environment


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="federated training with Flower: one client per speaker shard, local simulation",
        description="Federated two-phase training: the Flower ServerApp and one ClientApp per training shard "
        "(data.shards; 0 = one per speaker) on a local simulation. Only the trainable slice of the model "
        "travels; audio never leaves a client. Writes runs/<name>/round_<k>/{model.keras,model.tflite,"
        "manifest.json}, history.csv and plots/federated_uar.png.",
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. federated.strategy=fedprox")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/latest (same config required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of this name (only once the new run has finished)")
    p.add_argument("--transfer-dtype", choices=["float32", "float16"], default=None,
                   help="precision of the weights on the wire (float16 halves the bytes); = federated.transfer_dtype")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the ClientApps on this running Ray cluster (default: a private Ray on this machine); "
                   "every Ray node needs dsl_fed installed and the manifest's audio at the same paths")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.transfer_dtype:
        overrides.append(f"federated.transfer_dtype={args.transfer_dtype}")
    if args.resume and args.overwrite:
        raise DslFedError("--resume continues the existing run and --overwrite replaces it: give one of them")
    run_dir = simulate(args.config, overrides, resume=args.resume, overwrite=args.overwrite, ray_address=args.ray_address)
    print(summary(run_dir))
    return 0


def simulate(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    overwrite: bool = False,
    ray_cpus: int | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run the federated training of `config_path` through `flwr run` on a private local simulation.

    Everything that can be checked without Flower is checked first (config, manifest, partitions, federation
    size, whether the run can be resumed). A new run is written into a staging folder and replaces an earlier
    run of the same name only when it has finished (`dsl_fed.io.staged_run`); a resumed run continues in place.
    A run that stopped (failed, interrupted or killed) after a finished round is kept as ``runs/<name>/`` and
    can be resumed; without a finished round there is nothing to keep.
    One command at a time writes a run name (`dsl_fed.io.run_lock`), and every process the run started is
    gone when this returns or raises, or soon after this process is killed (`dsl_fed.federated.watchdog`).

    Args:
        config_path: YAML config.
        overrides: ``section.key=value`` overrides.
        resume: Continue from ``runs/<name>/latest``.
        echo: Receives the ServerApp's user-facing lines (one per round, warnings, errors).
        overwrite: Replace an earlier run of the same name once the new one has finished.
        ray_cpus: CPUs of the simulation's Ray instance (default: all of the machine's); an experiment cell
            passes its own share so parallel cells do not oversubscribe the cores.
        ray_address: ``HOST:PORT`` of a running Ray cluster whose nodes run the ClientApps (their CPUs count,
            not this machine's); None starts a private Ray here.

    Returns:
        The run folder ``<output.directory>/<output.name>`` (absolute).

    Raises:
        DslFedError: invalid config or data, a failed run (with the ServerApp's error message when it gave one).
    """
    from dsl_fed.data.nodes import check_decodable
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.run_config import check_availability, check_client_cpus, check_federation_size, count_shards

    config_path = Path(config_path).resolve()
    cfg = load_config(config_path, overrides)
    output_dir = Path(cfg.output.directory).resolve()  # relative to the current folder, like central runs
    run_dir = output_dir / cfg.output.name
    manifest = load_manifest(cfg.data)
    manifest.partition("devel", required=True)
    if cfg.federated.evaluate_test:
        manifest.partition("test", required=True)
    num_shards = count_shards(cfg, manifest)
    check_federation_size(cfg, num_shards)  # fail before Flower starts, not 20 s later in the ServerApp
    for warning in check_availability(cfg, num_shards):
        echo(f"warning: {warning}")
    if ray_address is not None:
        check_ray_address(ray_address)
        if ray_cpus is not None:
            raise DslFedError("ray_cpus sizes a private Ray; a cluster at ray_address has its own CPUs")
    else:
        check_client_cpus(cfg, ray_cpus)  # a cluster's CPUs are only known once connected; Flower checks them
    with run_lock(run_dir):
        settle_attempts(run_dir, has_round)  # what a killed run left: its finished rounds can be resumed
        if resume:
            RunDirectory(run_dir).check_resume(cfg)
        else:
            refuse_existing(run_dir, overwrite, resumable=True)
        check_decodable(manifest.clips, cfg.data.sample_rate)
        if resume:
            _run_flower(config_path, overrides, output_dir, run_dir, cfg, num_shards, resume, echo, ray_cpus,
                        ray_address)
        else:
            with staged_run(run_dir, overwrite, has_round) as staging:
                _run_flower(config_path, overrides, staging.parent, staging, cfg, num_shards, resume, echo,
                            ray_cpus, ray_address)
    return run_dir


def has_round(run_dir: Path) -> bool:
    """Whether a federated run folder holds a finished round (so it can be resumed, and is worth keeping)."""
    from dsl_fed.federated.checkpoint import RunDirectory

    return RunDirectory(run_dir).latest_round() is not None


def _run_flower(config_path: Path, overrides: Sequence[str], output_dir: Path, run_dir: Path, cfg: Config,
                num_shards: int, resume: bool, echo: Callable[[str], None], ray_cpus: int | None = None,
                ray_address: str | None = None) -> None:
    """`flwr run` on a private SuperLink, writing ``output_dir/<name>``; raises unless every round was written."""
    from dsl_fed.federated.run_config import run_config_toml, write_app
    from dsl_fed.federated.runtime import flwr_run, local_superlink, private_flwr_home, write_connection
    from dsl_fed.federated.watchdog import guard

    federation = {"num-supernodes": num_shards, "client-resources-num-cpus": int(cfg.federated.client_cpus)}
    if ray_cpus is not None:
        federation["init-args-num-cpus"] = ray_cpus
    on_line = ServerLines(echo)
    logs = run_dir / "logs"
    with private_flwr_home() as home, guard(cleanup=(home,)) as marker:
        env = {**marker, **ray_environment(ray_address)}
        run_config = home / "run_config.toml"
        # the simulation holds the whole corpus, so the server scores the held-out speakers itself
        run_config.write_text(run_config_toml(config_path, list(overrides), output_dir, resume, cfg.data.manifest))
        with local_superlink(home, logs / "superlink.log", env=env) as address:
            write_connection(home, address)
            where = f" on the Ray cluster at {ray_address}" if ray_address else ""
            echo(f"flower: {federation['num-supernodes']} clients, {federation['client-resources-num-cpus']} CPU each"
                 f"{where}; log {logs / 'flower.log'}")
            code = flwr_run(write_app(home / "app"), home, run_config, federation, logs / "flower.log", on_line,
                            env=env)
    check_complete(run_dir, cfg, on_line.errors, code, logs / "flower.log")


class ServerLines:
    """`flwr run` output handler: echoes the ServerApp's user-facing lines once, keeps its errors for the end."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.errors: list[str] = []

    def __call__(self, line: str) -> None:
        from dsl_fed.federated.runtime import progress_message

        message = progress_message(line)
        if message is not None and message.startswith("error: "):
            self.errors.append(message.removeprefix("error: "))  # raised (and printed once) after the run
        elif message is not None:
            self.echo(message)


def check_complete(run_dir: Path, cfg: Config, errors: list[str], code: int, log: Path) -> None:
    """Raise unless ``runs/<name>/latest`` reached the last round of the schedule."""
    from dsl_fed.federated.checkpoint import RunDirectory

    total = cfg.federated.phase1_rounds + cfg.federated.phase2_rounds
    run = RunDirectory(run_dir)
    done = run.latest_round() if run_dir.is_dir() else None
    if done is not None:  # a privacy budget (federated.dp.target_epsilon) may end the run early, by plan
        total = run.manifest(done)["extra"].get("privacy", {}).get("last_round", total)
    if done == total and not errors:
        return
    if errors:
        raise DslFedError(errors[-1])
    reason = failure_reason(log)
    raise DslFedError(f"federated run stopped after round {done or 0} of {total}"
                      f"{f': {reason}' if reason else f' (flwr run exit code {code})'}; log {log}")


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def failure_reason(log: Path) -> str | None:
    """The root cause of the last traceback in Flower's log (``ValueError: ActorPool is empty...``): in a chain
    of tracebacks ("The above exception was the direct cause ...") the root cause is printed first."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    reason, chained = None, False
    for line in lines:
        if line.startswith("Traceback (most recent call last)") and not chained:
            reason = None  # a new, unrelated traceback
        chained = line.startswith(("The above exception was", "During handling of the above exception"))
        match = _EXCEPTION_LINE.match(line)
        if match and reason is None:
            reason = f"{match.group(1)}: {match.group(2)}"[:300]
    return reason


def summary(run_dir: Path) -> str:
    """Last round's scores, the best round, where their TFLite models are, and clients that never contributed."""
    from dsl_fed.federated.checkpoint import RunDirectory

    run = RunDirectory(run_dir)
    k = run.latest_round()
    extra = run.manifest(k)["extra"]
    from dsl_fed.bootstrap import ci_text

    scores = ", ".join(f"{part} UAR {extra[part]['uar']:.3f} {ci_text(extra[part], clips=False)}"
                       for part in ("devel", "test") if part in extra)
    privacy = f", DP {extra['privacy']['guarantee']}" if "privacy" in extra else ""
    line = f"{run_dir}: round {k}/{extra['num_rounds']}, {scores}{privacy}; latest {run_dir / 'latest' / 'model.tflite'}"
    best = run.best_round()
    if best is not None:
        uar = run.manifest(best)["extra"]["devel"]["uar"]
        line += f"; best round {best} (devel UAR {uar:.3f}) {run_dir / 'best' / 'model.tflite'}"
    missing = extra.get("never_contributed") or []
    if missing:
        line += f"; never contributed: {'; '.join(missing)}"
    return line
