"""Flower's flat kebab-case run config <-> dsl_fed `Config`, in exactly one place.

Flower hands every ServerApp and ClientApp the same ``context.run_config``: the ``[tool.flwr.app.config]``
defaults of pyproject.toml plus ``flwr run --run-config`` overrides. Only keys declared there can be set, and
the apps run from an installed bundle (FAB) in ``$FLWR_HOME/apps/...``, so anything on disk (data, outputs)
must be an absolute path. The keys:

=================== =============================================================================
``config``          the YAML preset; a relative path is looked up inside the app bundle (``configs/``
                    ships with it), an absolute one is read in place
``data-manifest``   absolute manifest path, overriding ``data.manifest`` ("" = keep the YAML's)
``output-directory`` absolute folder for ``runs/``, overriding ``output.directory`` ("" = keep the YAML's,
                    which must then be absolute)
``overrides``       further ``section.key=value`` settings, space-separated (shell-style quoting)
``resume``          continue from the last complete round of ``runs/<name>/``
``server-eval-manifest`` absolute manifest of held-out audio on the server: its devel (and test) clips
                    are scored there each round; "" = the server holds no audio and the nodes evaluate
                    (federated evaluation from summed confusion counts)
=================== =============================================================================

This module imports neither Flower nor TensorFlow: the CLI uses it to build ``--run-config``.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dsl_fed.config import Config, load_config
from dsl_fed.errors import DslFedError

if TYPE_CHECKING:
    from dsl_fed.data import Manifest

# The run-config keys with their defaults, as declared in ``[tool.flwr.app.config]`` of the repo's pyproject.toml
# (a test keeps the two equal) and of the app folder `write_app` generates.
DEFAULTS: dict[str, str | bool] = {
    "config": "configs/quickstart.yaml",
    "data-manifest": "",
    "output-directory": "",
    "overrides": "",
    "resume": False,
    "server-eval-manifest": "",
}
KEYS = tuple(DEFAULTS)
PROGRESS_MARK = "[dsl_fed]"  # starts the ServerApp's log lines meant for users; `dsl_fed simulate` shows only those


def config_from_run_config(run_config: Mapping[str, object], app_dir: Path | None = None) -> Config:
    """Translate Flower's ``context.run_config`` into a validated `Config`.

    Every ServerApp and ClientApp calls this with the same run config, so all participants build the same
    model from the same settings. `app_dir` is the app bundle a relative ``config`` is looked up in (the
    repo's entry modules pass theirs); without one, ``config`` must be absolute.

    Raises:
        DslFedError: a missing key, an unreadable YAML or override, a relative output directory.
    """
    missing = [k for k in KEYS if k not in run_config]
    if missing:
        raise DslFedError(
            f"Flower run config lacks {', '.join(missing)}; declare them in [tool.flwr.app.config] of pyproject.toml"
        )
    path = Path(str(run_config["config"])).expanduser()
    if not path.is_absolute():
        if app_dir is None:
            raise DslFedError(f"run config 'config' must be an absolute path here, got {str(path)!r}")
        path = app_dir / path
    overrides = _split(str(run_config["overrides"]))
    if run_config["data-manifest"]:
        overrides.append(f"data.manifest={_absolute(run_config['data-manifest'], 'data-manifest')}")
    if run_config["output-directory"]:
        overrides.append(f"output.directory={_absolute(run_config['output-directory'], 'output-directory')}")
    cfg = load_config(path, overrides)
    if not Path(cfg.output.directory).is_absolute():
        raise DslFedError(
            f"output.directory {cfg.output.directory!r} is relative, but Flower runs the app from its installed "
            "bundle; pass an absolute folder: --run-config 'output-directory=\"/abs/runs\"'"
        )
    return cfg


def resume_requested(run_config: Mapping[str, object]) -> bool:
    """The run config's ``resume`` flag: continue from ``runs/<name>/latest``."""
    return bool(run_config.get("resume", False))


def server_eval_manifest(run_config: Mapping[str, object]) -> str:
    """The run config's ``server-eval-manifest`` (absolute), or "" when the server holds no audio."""
    value = run_config.get("server-eval-manifest", "")
    return _absolute(value, "server-eval-manifest") if value else ""


def count_shards(cfg: Config, manifest: Manifest | None = None) -> int:
    """Training shards of the config's corpus (`data.shards` groups of speakers) = SuperNodes needed.

    Raises:
        DslFedError: also for ``federated.dp`` on a corpus without speaker ids (`dsl_fed.privacy.check_speakers`):
            every federated simulation counts its shards here before it starts.
    """
    from dsl_fed.data import load_manifest, shard_clips
    from dsl_fed.privacy import check_speakers

    manifest = manifest or load_manifest(cfg.data)
    check_speakers(cfg, manifest)
    return len(shard_clips(manifest.partition("train", required=True), cfg.data.shards, cfg.data.seed))


def check_federation_size(cfg: Config, num_shards: int) -> None:
    """Node minimums above the number of shards would make the server wait forever."""
    fed = cfg.federated
    for key, value in (("min_available_nodes", fed.min_available_nodes), ("min_train_nodes", fed.min_train_nodes)):
        if value > num_shards:
            raise DslFedError(
                f"federated.{key}={value} but {cfg.data.manifest} gives only {num_shards} training shard(s) "
                f"(data.shards={cfg.data.shards}); lower it or add speakers"
            )


def check_availability(cfg: Config, num_clients: int | None) -> list[str]:
    """Read ``federated.availability`` before Flower starts (ids must be below `num_clients` when the federation's
    clients are known, a simulation's partition ids); returns warnings for the user (clients never online).

    Raises:
        DslFedError: one line naming the trace's file and row.
    """
    if not cfg.federated.availability:
        return []
    from dsl_fed.availability import read_trace

    trace = read_trace(cfg.federated.availability, num_clients)
    if num_clients is None:
        return []
    absent = num_clients - len(trace.clients)
    rounds = cfg.federated.phase1_rounds + cfg.federated.phase2_rounds
    never = [c for c in trace.clients if trace.first_round(c) > rounds]
    warnings = []
    if absent:
        warnings.append(f"federated.availability: {absent} of {num_clients} clients have no row in {trace.source} and "
                        "are never online")
    if never:
        warnings.append(f"federated.availability: {len(never)} client(s) of {trace.source} are online in none of the "
                        f"run's {rounds} rounds (e.g. client {never[0]})")
    return warnings


def check_client_cpus(cfg: Config, ray_cpus: int | None = None) -> None:
    """A client needing more CPUs than the simulation has would leave Ray's actor pool empty: the run would start,
    then stop with no round and the reason only in Flower's log."""
    available = ray_cpus if ray_cpus is not None else os.cpu_count() or 1
    if cfg.federated.client_cpus > available:
        source = "experiment.cpus_per_cell" if ray_cpus is not None else "this machine"
        raise DslFedError(f"federated.client_cpus={cfg.federated.client_cpus:g} but the simulation has {available} CPU(s) "
                          f"({source}), so no client could start; use at most {available}")


def run_config_toml(config_path: str | Path, overrides: list[str], output_directory: str | Path, resume: bool,
                    server_eval_manifest: str | Path = "") -> str:
    """The ``flwr run --run-config FILE.toml`` text that makes the apps load ``config_path`` + ``overrides``.

    Used by ``dsl_fed simulate`` and ``dsl_fed deploy local``: the apps then read the very YAML the user named,
    with the same overrides, so the CLI and ``flwr run .`` share one code path.
    """
    values = {
        "config": str(Path(config_path).resolve()),
        "data-manifest": "",
        "output-directory": str(Path(output_directory).resolve()),
        "overrides": shlex.join(overrides),
        "resume": resume,
        "server-eval-manifest": str(Path(server_eval_manifest).resolve()) if server_eval_manifest else "",
    }
    # TOML basic strings accept JSON's escapes, so json.dumps quotes paths and overrides safely.
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def write_app(folder: Path) -> Path:
    """Write a Flower app folder whose components are this package's apps; returns the folder.

    `dsl_fed simulate` runs this instead of the repo's folder, so it works from an installed wheel too (no
    checkout needed) and never bundles a user's data or runs that happen to lie in the current folder.
    """
    from dsl_fed import __version__

    config = "".join(f"{key} = {json.dumps(value)}\n" for key, value in DEFAULTS.items())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "dsl-fed"\nversion = "{__version__}"\ndependencies = []\n'
        'description = "dsl_fed federated training"\nlicense = { text = "Apache-2.0" }\n\n'  # Flower warns without them
        '[tool.flwr.app]\npublisher = "dsl-fed"\n\n'
        '[tool.flwr.app.components]\nserverapp = "dsl_fed.federated.server_app:app"\n'
        'clientapp = "dsl_fed.federated.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}"
    )
    return folder


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise DslFedError(f"run config 'overrides': cannot split {text!r} ({exc})") from None


def _absolute(value: object, key: str) -> str:
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        raise DslFedError(f"run config {key!r} must be an absolute path (the app runs from its bundle), got {value!r}")
    return str(path)
